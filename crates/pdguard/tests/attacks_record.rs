//! Issue 9, item 1: a seal record never steers a file operation. Each test plays an
//! attacker who can write the record (or plant files beside the image) and checks that the
//! real binary, offline and through the daemon, refuses with exit 1 and leaves the victim
//! file byte-for-byte untouched.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// A file the attacker wants root to delete or overwrite, in a directory of its own.
struct Victim {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Victim {
    fn new(dir: &Path) -> Self {
        let d = dir.join("secret");
        std::fs::create_dir(&d).unwrap();
        let path = d.join("shadow");
        let bytes = b"root:$6$precious-hash:19000:0:99999:7:::\n".repeat(40);
        std::fs::write(&path, &bytes).unwrap();
        Self { path, bytes }
    }

    fn assert_untouched(&self, ctx: &str) {
        let now =
            std::fs::read(&self.path).unwrap_or_else(|e| panic!("{ctx}: the victim is gone ({e})"));
        assert!(now == self.bytes, "{ctx}: the victim was changed");
    }
}

/// Edit the record's body as an attacker would: change fields, recompute the unkeyed
/// BLAKE3 checksum of the header, keep whatever MAC word was there.
fn forge(record: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let text = std::fs::read_to_string(record).unwrap();
    let (header, body) = text.split_once('\n').unwrap();
    let words: Vec<&str> = header.split(' ').collect();
    let mut v: Value = serde_json::from_str(body).unwrap();
    edit(v.as_object_mut().unwrap());
    let body = serde_json::to_string_pretty(&v).unwrap() + "\n";
    let sum = blake3::hash(body.as_bytes()).to_hex();
    let mut header = format!("{} {} {sum}", words[0], words[1]);
    for w in &words[3..] {
        header.push(' ');
        header.push_str(w);
    }
    std::fs::write(record, format!("{header}\n{body}")).unwrap();
}

fn refused(args: &[&str], cause: &str) {
    let o = pdguard(args);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{args:?} was not refused with exit 1: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    assert!(err.contains(cause), "{args:?}: {err:?} lacks {cause:?}");
}

/// An image sealed offline in `profile`, its key file (secure) and the flags to name it.
fn sealed_image(dir: &Path, profile: &str) -> (PathBuf, Vec<String>) {
    let img = dir.join("disk.img");
    tagged_image(&img, 256, 512, 7);
    let mut flags = vec!["--quiet".to_string()];
    if profile == "secure" {
        let key = keygen(dir, "master.key");
        flags.extend(["--key-file".into(), s(&key).into()]);
    }
    let mut args = vec!["image", "seal", s(&img), "--profile", profile];
    args.extend(flags.iter().map(String::as_str));
    let o = pdguard(&args);
    assert_eq!(code(&o), 0, "seal: {}", stderr(&o));
    (img, flags)
}

/// The cause each profile names: the MAC with the master key, the derived path without.
fn cause_of(profile: &str) -> &'static str {
    match profile {
        "secure" => "not authentic",
        _ => "never follows a path from a record",
    }
}

fn edited_record_naming_a_victim(profile: &str) {
    let dir = tempfile::tempdir().unwrap();
    let victim = Victim::new(dir.path());
    let (img, flags) = sealed_image(dir.path(), profile);
    let rec = record_of(&img);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    // Every phase in which a job deletes, truncates or writes the thin disk.
    for phase in [
        "sealed",
        "seal-gather",
        "unseal-scatter",
        "unseal-gather",
        "unsealed",
    ] {
        forge(&rec, |o| {
            o.insert("thin_path".into(), Value::from(s(&victim.path)));
            o.insert("phase".into(), Value::from(phase));
        });
        let before = state(&img);
        for cmd in ["seal", "unseal"] {
            let mut args = vec!["image", cmd, s(&img), "--profile", profile];
            if cmd == "unseal" {
                args.truncate(3);
            }
            args.extend(&flags);
            refused(&args, cause_of(profile));
            victim.assert_untouched(&format!("{profile} {cmd} in phase {phase}"));
            assert_eq!(
                state(&img),
                before,
                "{profile} {cmd} {phase}: image or record changed"
            );
        }
        // The record only claims a phase: put it back to sealed for the next round.
        forge(&rec, |o| {
            o.insert("phase".into(), Value::from("sealed"));
        });
    }
    // In the secure profile, verify and shred with the key refuse the edited record too.
    if profile == "secure" {
        let key = flags[2];
        refused(
            &["image", "verify", s(&img), "--key-file", key],
            "not authentic",
        );
        refused(
            &["image", "shred", s(&img), "--yes", "--key-file", key],
            "not authentic",
        );
        victim.assert_untouched("secure verify/shred");
    }
}

#[test]
fn an_edited_record_naming_a_victim_is_refused_patent_profile() {
    edited_record_naming_a_victim("patent");
}

#[test]
fn an_edited_record_naming_a_victim_is_refused_secure_profile() {
    edited_record_naming_a_victim("secure");
}

/// In the secure profile the MAC catches an edit that names no file at all (here the
/// sealed digest), which the derived-path rule alone cannot see. (The patent profile has
/// no key: such an edit goes undetected until the job's own checks, a documented limit.)
#[test]
fn an_edited_secure_record_is_refused_even_when_its_thin_path_is_right() {
    let dir = tempfile::tempdir().unwrap();
    let (img, flags) = sealed_image(dir.path(), "secure");
    let key = flags[2].as_str();
    forge(&record_of(&img), |o| {
        o.insert("sealed_digest".into(), Value::from("00".repeat(32)));
    });
    let before = state(&img);
    refused(
        &["image", "unseal", s(&img), "--key-file", key],
        "not authentic",
    );
    refused(
        &["image", "verify", s(&img), "--key-file", key],
        "not authentic",
    );
    assert_eq!(state(&img), before);
}

/// A symbolic link planted at the derived thin-disk path, at the record's temporary file
/// or at the key slot is never followed.
#[test]
fn planted_symlinks_are_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let victim = Victim::new(dir.path());
    let img = dir.path().join("disk.img");
    let plain = tagged_image(&img, 256, 512, 8);
    let o = pdguard(&["image", "seal", s(&img), "--profile", "patent", "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let rec: Value =
        serde_json::from_slice(&pdguard(&["image", "inspect", s(&img), "--json"]).stdout).unwrap();
    let id = rec["seal_id"].as_str().unwrap();
    let thin = dir
        .path()
        .join(format!("disk.img.{}.pdguard-thin", &id[..8]));
    assert_eq!(rec["thin_path"], s(&thin), "the derived thin path changed");
    std::os::unix::fs::symlink(&victim.path, &thin).unwrap();
    std::os::unix::fs::symlink(&victim.path, dir.path().join("disk.img.pdguard.tmp")).unwrap();
    let o = pdguard(&["image", "unseal", s(&img), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(std::fs::read(&img).unwrap() == plain, "unseal lost data");
    victim.assert_untouched("unseal with planted links");
    assert!(
        !thin.exists(),
        "the thin disk (or the link) was left behind"
    );

    // A link at the key slot's path: the secure seal refuses to touch it.
    let key = keygen(dir.path(), "master.key");
    let slot = dir.path().join("disk.img.pdguard.key");
    std::os::unix::fs::symlink(&victim.path, &slot).unwrap();
    refused(
        &["image", "seal", s(&img), "--key-file", s(&key), "--quiet"],
        "symbolic link",
    );
    victim.assert_untouched("secure seal with a linked key slot");
    assert!(std::fs::read(&img).unwrap() == plain);
}

/// Through the daemon: a disk adopted with `--path` is sealed by the daemon, its record
/// edited to name the victim; the unseal the daemon then runs (`disk unseal` or a reclaim
/// by `container up`) refuses, the disk is `failed` with the cause, the victim untouched.
fn daemon_case(profile: &str, reclaim: bool) {
    let dir = tempfile::tempdir().unwrap();
    let victim = Victim::new(dir.path());
    let key = keygen(dir.path(), "master.key");
    let d = Daemon::start(
        &dir.path().join("state"),
        &["--grace", "1h", "--profile", profile, "--key-file", s(&key)],
    );
    let img = dir.path().join("adopted.img");
    d.ok(&["disk", "create", "d1", "--size", "1M", "--path", s(&img)]);
    d.ok(&["disk", "seal", "d1"]);
    d.wait_state("d1", "sealed", 60);
    forge(&record_of(&img), |o| {
        o.insert("thin_path".into(), Value::from(s(&victim.path)));
    });
    let before = state(&img);
    let o = if reclaim {
        d.cli(&["container", "up", "c1", "--disk", "d1"])
    } else {
        d.cli(&["disk", "unseal", "d1"])
    };
    assert_eq!(code(&o), 1, "{profile}: {}", stderr(&o));
    assert!(
        stderr(&o).contains(cause_of(profile)),
        "{profile}: {}",
        stderr(&o)
    );
    let v = d.wait_state("d1", "failed", 60);
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains(cause_of(profile)), "{profile}: {err}");
    victim.assert_untouched(&format!("daemon {profile}"));
    assert_eq!(
        state(&img),
        before,
        "daemon {profile}: image or record changed"
    );
}

#[test]
fn the_daemon_refuses_an_edited_record_patent_profile() {
    daemon_case("patent", false);
}

#[test]
fn the_daemon_refuses_an_edited_record_secure_profile_on_reclaim() {
    daemon_case("secure", true);
}
