//! One style for errors, through the real binary: every usage error is one `pdguard: …`
//! line and exit 2 (and JSON with `--json`); sizes are read as people write them; `--path`
//! is made absolute and checked; `image shred` checks the seal before asking for `--yes`.
#![allow(clippy::unwrap_used)]

mod common;

use common::{client, code, json_of, keygen, pdguard, s, state, stderr, tagged_image, Serve};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A usage error: exit 2, one line on stderr that starts with `pdguard: ` and contains
/// `want`, nothing on stdout (without --json).
fn usage_error(args: &[&str], want: &str) -> String {
    let o = pdguard(args);
    let err = stderr(&o);
    assert_eq!(code(&o), 2, "{args:?}: {err}");
    assert_eq!(
        err.lines().count(),
        1,
        "{args:?}: more than one line:\n{err}"
    );
    assert!(err.starts_with("pdguard: "), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: {err:?} lacks {want:?}");
    for leak in [
        "error:",
        "Usage:",
        "expected number",
        "For more information",
    ] {
        assert!(!err.contains(leak), "{args:?}: clap's style leaks: {err}");
    }
    assert!(o.stdout.is_empty(), "{args:?}: {}", stdout(&o));
    err
}

#[test]
fn usage_errors_are_one_line_exit_2() {
    for (args, want) in [
        (
            &["image", "seal", "x.img", "--memory", "abc"][..],
            "\"abc\" is not a size",
        ),
        (&["image", "unseal", "x.img", "--memory", "0"], "zero bytes"),
        (
            &[
                "image",
                "unseal",
                "x.img",
                "--instant",
                "--thin-dir",
                "/tmp",
            ],
            "'--instant' cannot be used with '--thin-dir",
        ),
        (
            &[
                "image",
                "unseal",
                "x.img",
                "--instant",
                "--force",
                "--output",
                "y",
            ],
            "'--instant' cannot be used with '--force'",
        ),
        (
            &["image", "seal", "x.img", "--memory", "0.3K"],
            "307.2 bytes",
        ),
        (
            &["disk", "create", "d1", "--size", "-5M"],
            "cannot be negative",
        ),
        (&["disk", "create", "d1", "--size", "abc"], "is not a size"),
        (
            &["disk", "create", "d1", "--size", "1000"],
            "no sector size divides it; use 512 or 1K",
        ),
        (&["disk", "create", "d1"], "--size"),
        (&["serve", "--grace", "abc"], "is not a duration"),
        (&["serve", "--strategy", "foo"], "'foo'"),
        (
            &["serve", "--profile", "nope"],
            "possible values: secure, patent",
        ),
        (&["image", "seal", "x.img", "--placement", "foo"], "feistel"),
        (&["image", "seal", "x.img", "--strategy", "foo"], "window"),
        (&["demo", "--size", "4K"], "from 8K to 1G"),
        (&["frobnicate"], "frobnicate"),
        (&["disk"], "needs a command: create, ls"),
        (&[], "needs a command: image"),
        (&["image", "seal"], "<PATH>"),
        (
            &["container", "down", "c", "--crashed", "--removed"],
            "cannot be used with",
        ),
        (&["status", "--bogus"], "--bogus"),
        (
            &["image", "seal", "x.img", "--sector-size", "1000"],
            "from 512 to 65536",
        ),
        (
            &["image", "seal", "x.img", "--word-length", "3"],
            "power of two",
        ),
        (
            &["image", "seal", "x.img", "--thin-slack", "100000"],
            "0..=1000",
        ),
        (&["serve", "--jobs", "0"], "1 or more"),
        (
            &["serve", "--docker-mount-timeout", "2m"],
            "before dockerd gives up on it (2 min)",
        ),
        (
            &["serve", "--docker-mount-timeout", "0s"],
            "0 s: a Mount must answer",
        ),
        (
            &["serve", "--docker-mount-timeout", "soon"],
            "\"soon\" is not a duration",
        ),
    ] {
        let err = usage_error(args, want);
        if !args.is_empty() {
            // The fix: the help page of the command that was meant.
            assert!(err.contains("--help`"), "{err}");
        }
    }
}

#[test]
fn usage_errors_with_json_are_json() {
    let o = pdguard(&["disk", "create", "d1", "--size", "-5M", "--json"]);
    assert_eq!(code(&o), 2);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["exit_code"], 2);
    assert!(
        v["error"].as_str().unwrap().contains("cannot be negative"),
        "{v}"
    );
    assert_eq!(stderr(&o).lines().count(), 1);
    let o = pdguard(&["--json", "serve", "--grace", "x"]);
    assert_eq!(code(&o), 2);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("not a duration"),
        "{v}"
    );
}

#[test]
fn help_and_version_still_work() {
    for args in [
        &["--help"][..],
        &["-h"],
        &["disk", "create", "--help"],
        &["help", "image"],
    ] {
        let o = pdguard(args);
        assert_eq!(code(&o), 0, "{args:?}");
        assert!(stdout(&o).contains("Usage:"), "{args:?}");
    }
    let o = pdguard(&["--version"]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).starts_with("pdguard "), "{}", stdout(&o));
}

#[test]
fn sizes_people_write_are_accepted() {
    // The demo runs with a fractional size, and its JSON covers both profiles.
    let dir = tempfile::tempdir().unwrap();
    let o = pdguard(&["demo", "--dir", s(dir.path()), "--size", "1.5M", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["sectors"], 3072);
    assert_eq!(v["patent"]["bit_exact"], true);
    assert!(v["patent"]["moved"].as_u64().unwrap() > 0);
    assert_eq!(v["secure"]["bit_exact"], true);
    assert_eq!(v["secure"]["text_occurrences"], 0);
    assert!(
        v["secure"]["text_occurrences_in_original"]
            .as_u64()
            .unwrap()
            > 3072
    );
    assert_ne!(v["patent"]["sealed_digest"], v["secure"]["sealed_digest"]);
    // The --memory parser accepts 1GiB-style units (the seal then fails on the missing
    // image, not on the flag).
    let o = pdguard(&[
        "image",
        "seal",
        s(&dir.path().join("none.img")),
        "--memory",
        "1.5MiB",
    ]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
}

#[test]
fn the_demo_says_what_its_count_means() {
    let dir = tempfile::tempdir().unwrap();
    let o = pdguard(&["demo", "--dir", s(dir.path()), "--size", "16K"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("finds the text \"sector \" 0 times; in the original it occurs"),
        "{out}"
    );
    assert!(!out.contains("(the original has"), "{out}");
}

#[test]
fn disk_create_reads_sizes_and_makes_path_absolute() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = Serve::new(&state).profile("patent").start();
    let api = d.api().to_string();
    let v = json_of(&client(
        &[
            "disk", "create", "a", "--size", "1.5M", "--api", &api, "--json",
        ],
        &[],
    ));
    assert_eq!(v["size"], 1536 * 1024, "{v}");
    let v = json_of(&client(
        &[
            "disk", "create", "b", "--size", "2MiB", "--api", &api, "--json",
        ],
        &[],
    ));
    assert_eq!(v["size"], 2 << 20, "{v}");

    // A relative --path: made absolute by the client, which says so.
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let o = std::process::Command::new(common::bin())
        .args([
            "disk", "create", "c", "--size", "1M", "--path", "c.img", "--api", &api, "--json",
        ])
        .current_dir(&work)
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let abs = work.join("c.img");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["path"], s(&abs), "{v}");
    assert!(
        stderr(&o).contains(&format!(
            "--path c.img is relative: using {}",
            abs.display()
        )),
        "{}",
        stderr(&o)
    );
    assert!(abs.exists());

    // A missing directory: a usage error with the fix, and nothing registered or made.
    let missing = dir.path().join("no").join("such");
    let o = client(
        &[
            "disk",
            "create",
            "m",
            "--size",
            "1M",
            "--path",
            s(&missing.join("m.img")),
            "--api",
            &api,
        ],
        &[],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("mkdir -p {}", missing.display())),
        "{}",
        stderr(&o)
    );
    let v = json_of(&client(&["disk", "ls", "--api", &api, "--json"], &[]));
    let names: Vec<&str> = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert!(!missing.exists());
}

#[test]
fn shred_checks_the_seal_before_asking_for_yes() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    let img = dir.path().join("d.img");
    tagged_image(&img, 64, 512, 7);

    // Not sealed: said first (exit 1), not "add --yes".
    let o = pdguard(&["image", "shred", s(&img)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("not sealed"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("--yes"), "{}", stderr(&o));

    // Patent seal: no key to destroy, said without --yes.
    let o = pdguard(&["image", "seal", s(&img), "--profile", "patent", "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let before = state(&img);
    let o = pdguard(&["image", "shred", s(&img)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("patent profile"), "{}", stderr(&o));
    assert_eq!(state(&img), before);
    let o = pdguard(&["image", "unseal", s(&img), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // Secure seal without --yes: a usage error, exit 2, nothing changed.
    let o = pdguard(&["image", "seal", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let before = state(&img);
    let o = pdguard(&["image", "shred", s(&img), "--key-file", s(&key)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1);
    assert!(stderr(&o).contains("--yes to confirm"), "{}", stderr(&o));
    assert_eq!(state(&img), before);

    // With --yes it shreds; then a second shred says it is shredded, --yes or not.
    let o = pdguard(&["image", "shred", s(&img), "--key-file", s(&key), "--yes"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = pdguard(&["image", "shred", s(&img)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("crypto-erased"), "{}", stderr(&o));
}
