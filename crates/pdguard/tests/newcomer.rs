//! What a newcomer meets on a fresh clone, each tried as they would: a script that starts
//! `serve &` and waits for it with `status --wait`; a refused start that leaves nothing
//! behind; the start-up hint for a TCP API, run as printed; `--help`'s word on what is
//! logged; the NBD unix socket removed on SIGTERM; sizes and durations written for people;
//! the README's layout listing what the tree holds.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, Serve};
use common::{bin, code, s, stderr};

fn client(args: &[&str], state: &Path) -> std::process::Output {
    common::client(args, &[("PDGUARD_STATE_DIR", state)])
}

/// A script's `serve &` has not opened its socket when the next line runs: `status --wait`
/// waits for it; with nobody starting, it gives up with exit 124 and says why.
#[test]
fn status_wait_waits_for_a_daemon_that_is_starting() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let t0 = Instant::now();
    let o = client(&["status", "--wait", "700ms"], &state);
    assert_eq!(code(&o), 124, "{}", stderr(&o));
    assert!(t0.elapsed() >= Duration::from_millis(700));
    assert!(stderr(&o).contains("within 700ms"), "{}", stderr(&o));
    assert!(!state.exists(), "a client made the state directory");

    let waiter = Command::new(bin())
        .args(["status", "--wait", "20s", "--json"])
        .env("PDGUARD_STATE_DIR", &state)
        .env_remove("PDGUARD_API_TOKEN_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let daemon = Daemon::start(&state, &[]);
    let o = waiter.wait_with_output().unwrap();
    drop(daemon);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["profile"], "secure");
    // A bad duration is a usage error.
    assert_eq!(code(&client(&["status", "--wait", "soon"], &state)), 2);
}

/// A start refused for a bad setting changes nothing: no state directory, no master key.
#[test]
fn a_refused_start_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    for (i, extra) in [
        &["--nbd", "tcp:0.0.0.0:10809"][..],
        &["--nbd", "unix:/nonexistent/dir/s"],
        &["--docker", "--docker-driver", "bad name"],
        &["--docker", "--docker-host", "tcp://127.0.0.1:2375"],
        &["--api", "tcp:10.1.2.3:7070"],
        &["--api", "unix:/nonexistent/dir/api.sock"],
        &["--key-file", "/nonexistent/master.key"],
    ]
    .into_iter()
    .enumerate()
    {
        let state = dir.path().join(format!("state{i}"));
        // The secure profile: a start that went on would make a master key.
        let o = Serve::new(&state).args(extra).refused();
        assert_ne!(code(&o), 0, "{extra:?} started");
        assert_eq!(stderr(&o).lines().count(), 1, "{extra:?}: {}", stderr(&o));
        assert!(
            !state.exists(),
            "{extra:?} (exit {}) made {}: {}",
            code(&o),
            state.display(),
            stderr(&o)
        );
    }
}

/// The start-up hint for a TCP API is a command that works, run as printed.
#[test]
fn the_tcp_start_hint_works_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let daemon = Serve::new(&state).api_tcp().start();
    let log = daemon.log();
    let hint = log
        .lines()
        .find(|l| l.contains("next, in another shell: "))
        .unwrap_or_else(|| panic!("no hint: {log}"));
    let cmd = hint.split("next, in another shell: ").nth(1).unwrap();
    let words: Vec<&str> = cmd.split_whitespace().collect();
    assert_eq!(words[0], "pdguard", "{hint}");
    let o = Command::new(bin())
        .args(&words[1..])
        .env_remove("PDGUARD_STATE_DIR")
        .env_remove("PDGUARD_API_TOKEN_FILE")
        .output()
        .unwrap();
    drop(daemon);
    assert_eq!(code(&o), 0, "{cmd}: {}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("d1"));
}

/// `--help` says what is logged without PDGUARD_LOG, and `serve` does log it: the
/// service's INFO lines (a disk entering its grace period) with warnings.
#[test]
fn the_help_says_what_serve_logs_by_default() {
    let o = Command::new(bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("(default warn,pdguard_engine::service=info"),
        "{help}"
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // PDGUARD_LOG is not set (the harness clears it).
    let daemon = Daemon::start(&state, &["--grace", "1h"]);
    for args in [
        &["disk", "create", "d1", "--size", "1M"][..],
        &["container", "up", "c1", "--disk", "d1"],
        &["container", "down", "c1", "--removed"],
    ] {
        let o = client(args, &state);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = daemon.log();
        if let Some(l) = log.lines().find(|l| l.contains("grace period starts")) {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "not logged: {log}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(line.contains("INFO"), "{line}");
}

/// SIGTERM removes the NBD unix socket, as it removes the admin socket.
#[test]
fn sigterm_removes_the_nbd_socket() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let sock = dir.path().join("nbd.sock");
    let nbd = format!("unix:{}", s(&sock));
    let mut daemon = Daemon::start(&state, &["--nbd", &nbd]);
    assert!(sock.exists());
    assert_eq!(daemon.terminate(), 0, "{}", daemon.log());
    assert!(!state.join("pdguard.sock").exists());
    assert!(!sock.exists(), "the NBD socket stayed after SIGTERM");
}

/// `status` writes sizes and durations for people; `--json` keeps the raw numbers.
#[test]
fn status_reads_sizes_and_durations_for_people() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let daemon = Daemon::start(&state, &["--grace", "30s", "--jobs", "2"]);
    let o = client(&["disk", "create", "d1", "--size", "64M"], &state);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = client(&["status"], &state);
    let json = client(&["status", "--json"], &state);
    let show = client(&["disk", "show", "d1"], &state);
    let big = client(&["disk", "create", "d2", "--size", "1000000T"], &state);
    drop(daemon);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("grace 30 s"), "{text}");
    assert!(text.contains("64 MiB"), "{text}");
    assert!(text.contains("jobs: 0 running of 2, 0 queued"), "{text}");
    assert!(String::from_utf8_lossy(&show.stdout).contains("64 MiB"));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["grace_ms"], 30_000);
    assert_eq!(v["disks"][0]["size"], 64u64 << 20);
    assert_eq!(v["jobs"]["limit"], 2);
    let err = stderr(&big);
    assert!(
        err.contains("disk size 1000000 TiB is more than the "),
        "{err}"
    );
    assert!(!err.contains(" bytes free"), "{err}");
}

/// The README's layout lists every doc, contrib file and benchmark script, and every path it
/// names exists.
#[test]
fn the_readme_layout_lists_what_the_tree_holds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let layout = readme
        .split("## Layout")
        .nth(1)
        .and_then(|t| t.split("```").nth(1))
        .expect("README.md has a ## Layout section with a code block");
    let mut want = Vec::new();
    let mut dirs = vec!["docs".to_string(), "bench".to_string()];
    for e in std::fs::read_dir(root.join("contrib")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        dirs.push(format!("contrib/{name}"));
    }
    for sub in &dirs {
        for e in std::fs::read_dir(root.join(sub)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            want.push((sub, name));
        }
    }
    for (sub, name) in want {
        assert!(
            layout.contains(&name),
            "README.md's layout does not list {sub}/{name}"
        );
    }
    for word in layout.split_whitespace() {
        let word = word.trim_end_matches([',', ')', ':', ';']);
        let named = ["crates/", "bench/", "docs/", "contrib/", "fuzz/"]
            .iter()
            .any(|p| word.starts_with(p));
        if named {
            assert!(
                root.join(word).exists(),
                "README.md's layout names {word}, which does not exist"
            );
        }
    }
}
