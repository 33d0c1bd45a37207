//! The daemon adopts a file only once, never its own state, never one the kernel uses; a
//! sealed disk whose record is lost is `failed`, never served as plaintext; `disk rm`
//! never deletes sealed data silently (issue 9, items 2 and 4).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

/// How these tests run the daemon: no grace, no key.
const SERVE: &[&str] = &["--grace", "0s", "--profile", "patent"];

impl Daemon {
    /// `args` must fail with exit 1 and a message containing `why`.
    fn refused(&self, args: &[&str], why: &str) {
        let o = self.cli(args);
        assert_eq!(code(&o), 1, "{args:?} was not refused: {}", stderr(&o));
        assert!(stderr(&o).contains(why), "{args:?}: {}", stderr(&o));
    }

    fn disk_names(&self) -> Vec<String> {
        let v = self.ok(&["disk", "ls"]);
        v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect()
    }
}

fn random_file(path: &Path, bytes: usize, seed: u64) -> String {
    let mut data = vec![0u8; bytes];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut data[..]);
    std::fs::write(path, &data).unwrap();
    digest(path)
}

/// A loop device attached to a file for the test; detached when dropped, even on failure.
struct LoopDev(String);

impl LoopDev {
    fn attach(file: &Path) -> Self {
        let o = Command::new("losetup")
            .args(["--find", "--show", s(file)])
            .output()
            .unwrap_or_else(|e| panic!("cannot run losetup ({e}): install the Debian package mount (scripts/test.sh does) and run as root"));
        assert!(o.status.success(), "losetup failed: {}", stderr(&o));
        Self(String::from_utf8(o.stdout).unwrap().trim().to_string())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn one_file_is_one_disk_whatever_path_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("state"), SERVE);
    let x = dir.path().join("x");
    std::fs::create_dir(&x).unwrap();
    let img = x.join("v.img");
    random_file(&img, 1 << 20, 1);
    let v = d.ok(&["disk", "create", "a", "--size", "1M", "--path", s(&img)]);
    assert_eq!(v["path"], s(&std::fs::canonicalize(&img).unwrap()));
    let dotdot = x.join("..").join("x").join("v.img");
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let hard = dir.path().join("hard.img");
    std::fs::hard_link(&img, &hard).unwrap();
    for (name, p) in [("b", &dotdot), ("c", &link), ("e", &hard)] {
        d.refused(
            &["disk", "create", name, "--size", "1M", "--path", s(p)],
            "is the file of disk \"a\" already",
        );
    }
    assert_eq!(d.disk_names(), vec!["a".to_string()]);
}

#[test]
fn a_path_in_the_state_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = Daemon::start(&state, SERVE);
    let reg = state.join("registry.redb");
    let len = std::fs::metadata(&reg).unwrap().len();
    let via = dir
        .path()
        .join("state")
        .join("..")
        .join("state")
        .join("registry.redb");
    let link = dir.path().join("reg-link");
    std::os::unix::fs::symlink(&reg, &link).unwrap();
    for p in [&reg, &via, &link, &state.join("disks").join("new.img")] {
        let size = format!("{len}");
        d.refused(
            &["disk", "create", "r", "--size", &size, "--path", s(p)],
            "inside the state directory",
        );
    }
    assert!(!state.join("disks").join("new.img").exists());
    assert!(d.disk_names().is_empty());
    assert_eq!(code(&d.cli(&["status"])), 0);
}

#[test]
fn a_file_attached_to_a_loop_device_is_refused_by_the_daemon_and_by_image_seal() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("state"), SERVE);
    let img = dir
        .path()
        .join(format!("looped-{}.img", std::process::id()));
    let before = random_file(&img, 4 << 20, 2);
    let dev = LoopDev::attach(&img);
    d.refused(
        &["disk", "create", "l", "--size", "4M", "--path", s(&img)],
        &format!("attached to loop device {}", dev.0),
    );
    assert!(d.disk_names().is_empty());
    let o = pdguard(&["image", "seal", s(&img), "--profile", "patent", "--quiet"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("is attached to loop device {}", dev.0)),
        "{}",
        stderr(&o)
    );
    assert_eq!(state(&img), (before.clone(), "absent".into()));
    drop(dev);
    // Detached, the same file is fine.
    d.ok(&["disk", "create", "l", "--size", "4M", "--path", s(&img)]);
    assert_eq!(digest(&img), before);
}

/// An adopted disk, attached, written, then sealed when its container is removed.
fn sealed_disk(d: &Daemon, dir: &Path, name: &str, seed: u64) -> (PathBuf, String) {
    let img = dir.join(format!("{name}.img"));
    std::fs::write(&img, b"").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    d.ok(&["disk", "create", name, "--size", "4M", "--path", s(&img)]);
    let c = format!("c-{name}");
    d.ok(&["container", "up", &c, "--disk", name]);
    let plain = random_file(&img, 4 << 20, seed);
    d.ok(&["container", "down", &c, "--removed"]);
    d.wait_state(name, "sealed", 60);
    assert!(record_of(&img).exists());
    (img, plain)
}

#[test]
fn a_sealed_disk_whose_record_is_lost_is_failed_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("state"), SERVE);
    let (img, plain) = sealed_disk(&d, dir.path(), "lost", 3);
    let sealed = digest(&img);
    std::fs::remove_file(record_of(&img)).unwrap();
    d.refused(
        &["container", "up", "c2", "--disk", "lost"],
        "is missing, but the registry says the disk was sealed",
    );
    let v = d.ok(&["disk", "show", "lost"]);
    assert_eq!(v["state"], "failed", "{v}");
    assert!(v["error"].as_str().unwrap().contains("is missing"), "{v}");
    assert_eq!(v["containers"], serde_json::json!([]), "{v}");
    let cs = d.ok(&["container", "ls"]);
    assert!(
        !cs.to_string().contains("\"c2\""),
        "the failed container up left c2 behind: {cs}"
    );
    assert_eq!(digest(&img), sealed, "the sealed file was changed");
    assert_ne!(digest(&img), plain);
    // Asked again, still refused.
    d.refused(&["container", "up", "c3", "--disk", "lost"], "is missing");
    // A record restored from a backup brings it back (tested by hand in the issue); here the
    // only way out is to forget it, keeping the file.
    d.refused(&["disk", "rm", "lost"], "--keep-file");
    d.ok(&["disk", "rm", "lost", "--keep-file"]);
    assert_eq!(digest(&img), sealed);
}

#[test]
fn disk_rm_of_a_sealed_disk_needs_shred_or_keep_file_and_keep_file_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("state"), SERVE);
    let (img, plain) = sealed_disk(&d, dir.path(), "kept", 4);
    let before = state(&img);
    d.refused(
        &["disk", "rm", "kept"],
        "pass --shred to crypto-erase it, or --keep-file",
    );
    assert_eq!(
        state(&img),
        before,
        "a refused rm changed the file or record"
    );
    assert_eq!(d.disk_names(), vec!["kept".to_string()]);
    let v = d.ok(&["disk", "rm", "kept", "--keep-file"]);
    assert_eq!(v["kept_file"], true);
    assert_eq!(state(&img), before);
    assert!(d.disk_names().is_empty());
    // The file and its record still hold the data: the image CLI unseals it bit-exact.
    let o = pdguard(&["image", "unseal", s(&img), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(digest(&img), plain);
}

#[test]
fn a_restarted_daemon_marks_a_sealed_disk_without_its_record_failed() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let d = Daemon::start(&state_dir, SERVE);
    let (img, _) = sealed_disk(&d, dir.path(), "gone", 5);
    drop(d);
    let sealed = digest(&img);
    std::fs::remove_file(record_of(&img)).unwrap();
    let d = Daemon::start(&state_dir, SERVE);
    let v = d.ok(&["disk", "show", "gone"]);
    assert_eq!(v["state"], "failed", "{v}");
    assert!(v["error"].as_str().unwrap().contains("is missing"), "{v}");
    d.refused(&["container", "up", "c9", "--disk", "gone"], "is missing");
    assert_eq!(digest(&img), sealed);
}

#[test]
fn a_daemon_job_and_an_image_cli_job_never_run_on_one_file_together() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("state"), SERVE);
    let img = dir.path().join("shared.img");
    let plain = random_file(&img, 4 << 20, 6);
    d.ok(&["disk", "create", "sh", "--size", "4M", "--path", s(&img)]);
    // A CLI seal stopped half-way through its scatter holds the image.
    let pause = dir.path().join("paused");
    let mut cli = Command::new(bin())
        .args(["image", "seal", s(&img), "--profile", "patent", "--quiet"])
        .env("PDGUARD_TEST_PAUSE_AT", "scatter:2097152")
        .env("PDGUARD_TEST_PAUSE_FILE", &pause)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pause.exists() {
        assert!(
            cli.try_wait().unwrap().is_none(),
            "the CLI seal ended early"
        );
        assert!(Instant::now() < deadline, "the CLI seal never paused");
        std::thread::sleep(Duration::from_millis(2));
    }
    let busy = format!("busy: another pdguard job (pid {}) holds", cli.id());
    d.refused(&["disk", "seal", "sh"], &busy);
    let v = d.ok(&["disk", "show", "sh"]);
    assert_eq!(v["state"], "failed", "{v}");
    assert!(v["error"].as_str().unwrap().contains(&busy), "{v}");
    std::fs::remove_file(&pause).unwrap();
    assert!(cli.wait().unwrap().success());
    let o = pdguard(&["image", "unseal", s(&img), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(digest(&img), plain);
    // The daemon's disk was never touched by its refused job: unsealing it is a no-op.
    let v = d.ok(&["disk", "unseal", "sh"]);
    assert_eq!(v["state"], "available", "{v}");
    assert_eq!(digest(&img), plain);
}

/// A file sealed offline (`pdguard image seal`, its record beside it) and then adopted is
/// `sealed`; `container up` unseals and verifies it before the container comes up, and the
/// file holds the plaintext again. Sealed offline after adoption: the same at the reclaim.
/// Tampered: `container up` exits 3 naming the digest, the disk `failed`, no container up.
#[test]
fn a_file_sealed_offline_is_unsealed_by_the_reclaim_never_served_scrambled() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &dir.path().join("state"),
        &["--grace", "1h", "--profile", "patent"],
    );
    let seal = |img: &Path| {
        let o = pdguard(&["image", "seal", s(img), "--profile", "patent", "--quiet"]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    };
    for (i, when) in ["before adoption", "after adoption", "tampered"]
        .into_iter()
        .enumerate()
    {
        let name = format!("s{i}");
        let img = dir.path().join(format!("{name}.img"));
        let plain = random_file(&img, 1 << 20, 40 + i as u64);
        if when != "after adoption" {
            seal(&img);
        }
        if when == "tampered" {
            let mut bytes = std::fs::read(&img).unwrap();
            bytes[300_000] ^= 0x40;
            std::fs::write(&img, &bytes).unwrap();
        }
        d.ok(&["disk", "create", &name, "--size", "1M", "--path", s(&img)]);
        let want = if when == "after adoption" {
            "available"
        } else {
            "sealed"
        };
        assert_eq!(d.disk(&name)["state"], want, "{when}");
        if when == "after adoption" {
            seal(&img);
        }
        assert_ne!(digest(&img), plain, "{when}: not sealed");
        let c = format!("c{i}");
        let o = d.cli(&["container", "up", &c, "--disk", &name]);
        if when == "tampered" {
            assert_eq!(code(&o), 3, "{}", stderr(&o));
            assert!(stderr(&o).contains("digest"), "{}", stderr(&o));
            assert_eq!(d.disk(&name)["state"], "failed");
            assert_eq!(d.disk(&name)["containers"], serde_json::json!([]));
            continue;
        }
        assert_eq!(code(&o), 0, "{when}: {}", stderr(&o));
        assert_eq!(d.disk(&name)["state"], "attached", "{when}");
        assert_eq!(
            digest(&img),
            plain,
            "{when}: the container got scrambled data"
        );
        assert!(!record_of(&img).exists(), "{when}");
    }
}
