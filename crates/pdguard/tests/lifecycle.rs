//! The daemon's disk life cycle seen from the CLI: a job's typed failure reaches the exit
//! code (3 when the data does not verify, with the cause), and a state directory others
//! could write is refused at start.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;

use common::*;

fn flip_a_byte(path: &std::path::Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_daemon_unseal_that_fails_verification_exits_3_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("state"), &["--profile", "patent"]);
    let v = d.ok(&["disk", "create", "d1", "--size", "1M"]);
    let path = PathBuf::from(v["path"].as_str().unwrap());
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    d.ok(&["disk", "seal", "d1"]);
    flip_a_byte(&path, 4096 + 17);

    let o = d.cli(&["disk", "unseal", "d1"]);
    let err = stderr(&o);
    assert_eq!(code(&o), 3, "{err}");
    assert!(
        err.contains("unseal failed") && err.contains("digest"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // A reclaim meets the same: exit 3, and the container is not up.
    let o = d.cli(&["container", "up", "c1", "--disk", "d1"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("digest"), "{}", stderr(&o));
    let st = d.ok(&["status"]);
    assert_eq!(st["containers"].as_array().unwrap().len(), 0, "{st}");
    assert_eq!(d.disk("d1")["state"], "failed");

    // --json carries the same exit code.
    let o = d.cli(&["disk", "unseal", "d1", "--json"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
}

#[test]
fn serve_refuses_a_state_dir_others_may_write() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = Serve::new(&state).profile("patent").refused();
    let err = stderr(&o);
    assert_eq!(code(&o), 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("writable by its group or others") && err.contains("chmod 700"),
        "{err}"
    );
    // Refused, not re-moded, and nothing was made in it.
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o777);
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
}

#[test]
fn serve_refuses_a_grace_past_ten_years() {
    let dir = tempfile::tempdir().unwrap();
    let o = Serve::new(&dir.path().join("st"))
        .profile("patent")
        .args(&["--grace", "20000days"])
        .refused();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("--grace"), "{}", stderr(&o));
}
