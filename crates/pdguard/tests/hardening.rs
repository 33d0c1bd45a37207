//! End-to-end tests of the smaller hardening items of issue 9: disk sizes bounded by the
//! file system, a record read only up to its limit, keys kept out of core dumps, and key
//! files owned by someone else refused.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// POST a JSON body on the daemon's unix socket: (status, body).
fn post(sock: &Path, path: &str, body: &str) -> (u16, Value) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: pdguard\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let v = out
        .split_once("\r\n\r\n")
        .and_then(|x| serde_json::from_str(x.1).ok())
        .unwrap_or(Value::Null);
    (status, v)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn disk_sizes_beyond_the_file_system_are_refused_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = Serve::new(&state).profile("patent").start();
    let sock = state.join("pdguard.sock");
    let none: &[(&str, &Path)] = &[];
    let cli = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend_from_slice(&["--state-dir", s(&state)]);
        client(&a, none)
    };
    let adopted = dir.path().join("adopted.img");
    let adopted_json = serde_json::to_string(s(&adopted)).unwrap();
    // Just over the free space of the state directory's file system.
    let st = rustix::fs::statvfs(&state).unwrap();
    let over_free = (st.f_bavail * st.f_frsize + (1 << 30)).next_multiple_of(512);
    for (name, body) in [
        // 2^63: over the largest file offset.
        (
            "huge",
            r#"{"name":"huge","size":9223372036854775808}"#.to_string(),
        ),
        // The largest multiple of 512 under 2^63: over the free space.
        (
            "big",
            r#"{"name":"big","size":9223372036854775296}"#.to_string(),
        ),
        // An adopted path that does not exist yet is created: the same bounds.
        (
            "adopt",
            format!(r#"{{"name":"adopt","size":9223372036854775296,"path":{adopted_json}}}"#),
        ),
        ("over", format!(r#"{{"name":"over","size":{over_free}}}"#)),
    ] {
        let (st, v) = post(&sock, "/v1/disks", &body);
        assert_eq!(st, 400, "{name}: {v}");
        assert_eq!(v["error"]["code"], "invalid_request", "{name}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            !msg.contains('\n') && msg.contains("pick a smaller size"),
            "{msg}"
        );
        // Nothing left behind by this refusal.
        assert!(
            entries(&state.join("disks")).is_empty() && !adopted.exists(),
            "{name}: a refused create left a file: {:?}",
            entries(&state.join("disks"))
        );
    }
    // The CLI's 100T (over any free space here, and over ext4's 16 TiB file limit).
    let o = cli(&["disk", "create", "t100", "--size", "100T"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("pick a smaller size"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    // Nothing was left behind: no file, no registry entry, and every name is free again.
    assert!(
        entries(&state.join("disks")).is_empty(),
        "{:?}",
        entries(&state.join("disks"))
    );
    assert!(
        !adopted.exists(),
        "a refused create left {}",
        adopted.display()
    );
    let v = json_of(&cli(&["disk", "ls", "--json"]));
    assert_eq!(v["disks"].as_array().unwrap().len(), 0, "{v}");
    for name in ["huge", "big", "t100", "over"] {
        json_of(&cli(&["disk", "create", name, "--size", "1M", "--json"]));
    }
    let (st, v) = post(
        &sock,
        "/v1/disks",
        &format!(r#"{{"name":"adopt","size":1048576,"path":{adopted_json}}}"#),
    );
    assert_eq!(st, 201, "{v}");
    assert_eq!(std::fs::metadata(&adopted).unwrap().len(), 1 << 20);
    drop(d);
}

#[test]
fn a_record_of_dev_zero_is_refused_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    tagged_image(&img, 64, 512, 9);
    let key = keygen(dir.path(), "master.key");
    let before = digest(&img);
    for cmd in ["inspect", "verify", "unseal", "seal"] {
        let t = Instant::now();
        // Under a 2 GiB address-space limit, so that a regression (reading /dev/zero whole)
        // fails here at once instead of eating the shared machine's memory.
        let mut child = Command::new("sh")
            .args(["-c", "ulimit -v 2097152 && exec \"$0\" \"$@\"", bin()])
            .args(["image", cmd, s(&img), "--record", "/dev/zero"])
            // inspect reads no key and takes no --key-file.
            .args(if cmd == "inspect" {
                vec![]
            } else {
                vec!["--key-file", s(&key)]
            })
            .env_remove("PDGUARD_KEY_FILE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        while child.try_wait().unwrap().is_none() {
            if t.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("image {cmd} --record /dev/zero still running after 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let o = child.wait_with_output().unwrap();
        assert_eq!(code(&o), 1, "{cmd}: {}", stderr(&o));
        // Refused before a byte is read: a character device is not a regular file.
        assert!(
            stderr(&o).contains("character device, not a regular file"),
            "{cmd}: {}",
            stderr(&o)
        );
        assert_eq!(digest(&img), before, "{cmd} changed the image");
    }
}

/// The daemon and the image commands make themselves non-dumpable. Observable from outside:
/// the kernel then makes `/proc/PID/*` owned by root, even for a process of another user. So
/// the daemon runs as nobody (uid 65534) here, which needs root.
#[test]
fn the_daemon_is_not_dumpable() {
    assert_eq!(
        std::fs::metadata("/proc/self").unwrap().uid(),
        0,
        "this test needs root (it runs the daemon as uid 65534)"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let d = Serve::new(&state).profile("patent").uid(65534).start();
    let pid = d.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().nth(2) == Some("65534"),
        "{uid_line}"
    );
    let owner = std::fs::metadata(format!("/proc/{pid}/status"))
        .unwrap()
        .uid();
    assert_eq!(
        owner, 0,
        "/proc/{pid}/status of a daemon running as uid 65534 is owned by uid {owner}: the daemon is dumpable"
    );
}

#[test]
fn a_key_file_owned_by_another_user_is_refused() {
    assert_eq!(
        std::fs::metadata("/proc/self").unwrap().uid(),
        0,
        "this test needs root (it chowns a key file to uid 65534)"
    );
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    std::os::unix::fs::chown(&key, Some(65534), Some(65534)).unwrap();
    let key_bytes = std::fs::read(&key).unwrap();
    let img = dir.path().join("disk.img");
    tagged_image(&img, 64, 512, 5);
    let before = state(&img);
    let o = pdguard(&["image", "seal", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("chown"), "{}", stderr(&o));
    assert!(stderr(&o).contains("uid 65534"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    assert_eq!(
        state(&img),
        before,
        "a refused seal changed the image or record"
    );
    // The daemon refuses it too, before it starts serving.
    let st = dir.path().join("state");
    let o = Serve::new(&st)
        .profile("patent")
        .args(&["--key-file", s(&key)])
        .refused();
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("chown"), "{}", stderr(&o));
    assert!(!st.join("pdguard.sock").exists());
    assert_eq!(
        std::fs::read(&key).unwrap(),
        key_bytes,
        "the key file changed"
    );
    // Owned by root again: accepted.
    std::os::unix::fs::chown(&key, Some(0), Some(0)).unwrap();
    let o = pdguard(&["image", "seal", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// The image commands too: `image seal` paused by the test hook as its scatter pass starts
/// (after the start of `main`), run as uid 65534; its `/proc/PID/status` must become root's.
/// (A FIFO record no longer blocks anything: it is refused at once.)
#[test]
fn image_commands_are_not_dumpable() {
    assert_eq!(
        std::fs::metadata("/proc/self").unwrap().uid(),
        0,
        "this test needs root (it runs pdguard as uid 65534)"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let work = dir.path().join("w");
    std::fs::create_dir(&work).unwrap();
    let img = work.join("disk.img");
    tagged_image(&img, 64, 512, 3);
    let pause = work.join("paused");
    for p in [&work, &img] {
        std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    }
    let child = Command::new(bin())
        .args(["image", "seal", s(&img), "--profile", "patent", "--quiet"])
        .env("PDGUARD_TEST_PAUSE_AT", "scatter:0")
        .env("PDGUARD_TEST_PAUSE_FILE", &pause)
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(Option<std::process::Child>);
    impl Drop for Kill {
        fn drop(&mut self) {
            if let Some(c) = self.0.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let pid = child.id();
    let mut guard = Kill(Some(child));
    let status = format!("/proc/{pid}/status");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut owner = u32::MAX;
    while Instant::now() < deadline {
        owner = std::fs::metadata(&status).map_or(u32::MAX, |m| m.uid());
        if owner == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let text = std::fs::read_to_string(&status).unwrap_or_default();
    assert!(
        text.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("65534")),
        "not running as 65534: {text}"
    );
    assert_eq!(
        owner, 0,
        "{status} of `image seal` running as uid 65534 is owned by uid {owner}: it is dumpable"
    );
    // Let it go on: it finishes its seal.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pause.exists() {
        assert!(Instant::now() < deadline, "the seal never paused");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::remove_file(&pause).unwrap();
    let o = guard.0.take().unwrap().wait_with_output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}
