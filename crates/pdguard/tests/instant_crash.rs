//! A daemon killed (`kill -9`) while an instant volume (`-o reclaim=instant`,
//! docs/instant-reclaim.md §8) is mounted over its FUSE file leaves a dead mount behind: the
//! volume's ext4 at its mountpoint, on a loop device on the dead FUSE file, and the dead
//! FUSE mount. The restarted daemon cleans it, and the next Mount succeeds with every
//! flushed byte there.
//!
//! Driven through the volume plugin's own socket (`VolumeDriver.*`, as dockerd would call
//! it), without dockerd: `--docker-host` names a socket nobody serves.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::http::over_unix;
use common::*;
use rand::{RngCore, SeedableRng};
use serde_json::Value;

/// The mounts of this process's mount table at `dir`: (device, file system type).
fn mounts_at(dir: &Path) -> Vec<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = dir.to_string_lossy();
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let point = f.get(4)?.replace("\\040", " ");
            let fstype = right.split(' ').next()?.to_string();
            (point == want).then(|| (f[2].to_string(), fstype))
        })
        .collect()
}

/// Loop devices whose backing file is on the file system of device `dev` (`major:minor`).
fn loops_on(dev: &str) -> Vec<String> {
    let o = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-MAJ:MIN"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (name, back) = (f.next()?, f.next()?);
            (back == dev).then(|| name.to_string())
        })
        .collect()
}

/// Undoes what the test made, even when it fails: the daemon killed (its own Drop), then
/// lazy unmounts at the mountpoint and the FUSE dir, the loop devices on the FUSE files seen
/// detached, the plugin's socket removed.
struct Cleanup {
    mount_dir: PathBuf,
    fuse_dir: PathBuf,
    fuse_devs: Vec<String>,
    sock: PathBuf,
    daemon: Option<Daemon>,
    /// A process holding the old mount, as a container would.
    holder: Option<std::process::Child>,
}

/// Kill and reap the holder, if any.
fn let_go(holder: &mut Option<std::process::Child>) {
    if let Some(mut h) = holder.take() {
        let _ = h.kill();
        let _ = h.wait();
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        drop(self.daemon.take());
        let_go(&mut self.holder);
        for _ in 0..8 {
            if mounts_at(&self.mount_dir).is_empty() {
                break;
            }
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mount_dir)
                .status();
        }
        for (dev, _) in mounts_at(&self.fuse_dir) {
            self.fuse_devs.push(dev);
        }
        for dev in &self.fuse_devs {
            for l in loops_on(dev) {
                let _ = Command::new("losetup").args(["-d", &l]).status();
            }
        }
        for _ in 0..8 {
            if mounts_at(&self.fuse_dir).is_empty() {
                break;
            }
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.fuse_dir)
                .status();
        }
        let _ = std::fs::remove_file(&self.sock);
    }
}

fn plugin(sock: &Path, path: &str, body: &str) -> Value {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: plugin\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, answer) = over_unix(sock, req.as_bytes());
    assert_eq!(status, 200, "{path}: {answer}");
    serde_json::from_str(&answer).unwrap()
}

/// Write `data` to `file` and fsync it (and its directory).
fn write_synced(file: &Path, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    std::fs::File::open(file.parent().unwrap())
        .unwrap()
        .sync_all()
        .unwrap();
}

#[test]
fn a_restarted_daemon_cleans_a_dead_instant_mount_and_mounts_again() {
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let state = root.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let pause = root.join("paused");
    let driver = format!("pdguard-crash-{}", std::process::id());
    let sock = PathBuf::from(format!("/run/docker/plugins/{driver}.sock"));
    let nobody = format!("unix://{}", s(&root.join("no-dockerd.sock")));
    let base = Serve::new(&state)
        .profile("patent")
        .args(&["--grace", "1s", "--docker", "--docker-driver", &driver])
        .args(&["--docker-host", &nobody, "--docker-resync", "1h"])
        .env("PDGUARD_LOG", "info");
    // The migration is held as it starts, so that the kill lands mid-migration.
    let paused = base
        .clone()
        .env("PDGUARD_TEST_PAUSE_AT", "migrate:0")
        .env("PDGUARD_TEST_PAUSE_FILE", &pause);
    let mut c = Cleanup {
        mount_dir: state.join("mounts").join("v"),
        fuse_dir: state.join("fuse").join("v"),
        fuse_devs: Vec::new(),
        sock: sock.clone(),
        daemon: Some(paused.start()),
        holder: None,
    };
    let (mount_dir, fuse_dir) = (c.mount_dir.clone(), c.fuse_dir.clone());
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let mut before = vec![0u8; 3 << 20];
    rng.fill_bytes(&mut before);
    let mut during = vec![0u8; 2 << 20];
    rng.fill_bytes(&mut during);

    // An instant volume, written, unmounted, sealed.
    let v = plugin(
        &sock,
        "/VolumeDriver.Create",
        r#"{"Name":"v","Opts":{"size":"64M","reclaim":"instant"}}"#,
    );
    assert_eq!(v["Err"], "", "{v}");
    let m = r#"{"Name":"v","ID":"a1"}"#;
    let v = plugin(&sock, "/VolumeDriver.Mount", m);
    assert_eq!(v["Err"], "", "{v}");
    assert_eq!(v["Mountpoint"], s(&mount_dir));
    write_synced(&mount_dir.join("before"), &before);
    let v = plugin(&sock, "/VolumeDriver.Unmount", m);
    assert_eq!(v["Err"], "", "{v}");
    let d = c.daemon.as_ref().unwrap();
    // Without dockerd the daemon seals nothing on its own (it cannot tell which containers
    // are operational): sealed by hand.
    let o = d.cli(&["disk", "seal", "v"]);
    assert_eq!(code(&o), 0, "{}\n{}", stderr(&o), d.log());
    d.wait_state("v", "sealed", 40);

    // Mounted again: served through its migration (held); more written and flushed.
    let v = plugin(&sock, "/VolumeDriver.Mount", m);
    assert_eq!(v["Err"], "", "{v}\n{}", d.log());
    assert_eq!(d.disk("v")["state"], "migrating");
    write_synced(&mount_dir.join("during"), &during);
    let fuse = mounts_at(&fuse_dir);
    assert_eq!(fuse.len(), 1, "{fuse:?}");
    let fuse_dev = fuse[0].0.clone();
    c.fuse_devs.push(fuse_dev.clone());
    let on_fuse = loops_on(&fuse_dev);
    assert_eq!(on_fuse.len(), 1, "{on_fuse:?}");

    // A container's process has its working directory in the volume.
    c.holder = Some(
        Command::new("sleep")
            .arg("120")
            .current_dir(&mount_dir)
            .spawn()
            .unwrap(),
    );

    // kill -9: the dead mount stays (the precondition this test is about).
    c.daemon.as_mut().unwrap().kill9();
    let at_mount = mounts_at(&mount_dir);
    assert_eq!(
        at_mount.len(),
        1,
        "nothing left at the mountpoint: {at_mount:?}"
    );
    assert_eq!(at_mount[0].1, "ext4");
    assert_eq!(mounts_at(&fuse_dir), fuse, "the dead FUSE mount is gone");
    let e = std::fs::metadata(&fuse_dir).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(107), "not ENOTCONN: {e}");
    assert_eq!(loops_on(&fuse_dev), on_fuse);

    // Restarted (the migration no longer held): cleaned at start, mounted again.
    let _ = std::fs::remove_file(&pause);
    c.daemon.as_mut().unwrap().restart_as(base);
    let d = c.daemon.as_ref().unwrap();
    // Cleaned as the daemon started, before any Mount.
    assert!(
        mounts_at(&fuse_dir).is_empty(),
        "{:?}",
        mounts_at(&fuse_dir)
    );
    assert!(
        d.log().contains("cleaned what it left"),
        "not cleaned at start: {}",
        d.log()
    );
    let v = plugin(&sock, "/VolumeDriver.Mount", r#"{"Name":"v","ID":"b2"}"#);
    assert_eq!(v["Err"], "", "{v}\n{}", d.log());
    // One FUSE mount, one loop device on it, one file system: the new ones. The old loop
    // device stays (its detach deferred, autoclear) while the old file system, lazily
    // unmounted, is still held by the process in it; the kernel gives the new FUSE mount
    // another device number meanwhile.
    let now = mounts_at(&fuse_dir);
    assert_eq!(now.len(), 1, "{now:?}");
    let new_dev = now[0].0.clone();
    c.fuse_devs.push(new_dev.clone());
    assert_ne!(new_dev, fuse_dev);
    assert_eq!(loops_on(&new_dev).len(), 1, "{:?}", loops_on(&new_dev));
    assert_eq!(
        mounts_at(&mount_dir).len(),
        1,
        "{:?}",
        mounts_at(&mount_dir)
    );
    let held = loops_on(&fuse_dev);
    eprintln!("while the old file system is held, on the dead FUSE file: {held:?}");
    // The holder goes (the container stops): the kernel lets the old loop device go.
    let_go(&mut c.holder);
    let t = std::time::Instant::now();
    while !loops_on(&fuse_dev).is_empty() && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        loops_on(&fuse_dev).is_empty(),
        "a loop device on the dead FUSE file is left once nothing holds it: {:?}",
        loops_on(&fuse_dev)
    );
    let log = d.log();
    let cleaned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cleaned what it left"))
        .collect();
    assert_eq!(cleaned.len(), 1, "{log}");
    eprintln!("{}", cleaned[0]);
    for what in [
        " WARN ",
        "volume=v",
        "unmounted the ext4 file system at",
        &format!("detached {}", on_fuse[0]),
        "unmounted the dead FUSE mount at",
    ] {
        assert!(cleaned[0].contains(what), "{what:?} not in {}", cleaned[0]);
    }
    assert!(std::fs::read(mount_dir.join("before")).unwrap() == before);
    assert!(std::fs::read(mount_dir.join("during")).unwrap() == during);

    // Unmounted (the Mount from before the kill is still counted, as dockerd still counts
    // it: its container's Unmount comes too): nothing mounted or attached is left.
    let v = plugin(&sock, "/VolumeDriver.Unmount", r#"{"Name":"v","ID":"b2"}"#);
    assert_eq!(v["Err"], "", "{v}");
    assert_eq!(mounts_at(&mount_dir).len(), 1, "unmounted under a1");
    let v = plugin(&sock, "/VolumeDriver.Unmount", m);
    assert_eq!(v["Err"], "", "{v}");
    assert_eq!(mounts_at(&mount_dir), vec![]);
    assert_eq!(mounts_at(&fuse_dir), vec![]);
    let fuse_file = fuse_dir.join("disk");
    let o = Command::new("losetup")
        .arg("-j")
        .arg(&fuse_file)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "");
    assert!(loops_on(&fuse_dev).is_empty());
    assert!(loops_on(&new_dev).is_empty());
    eprintln!("took {:?}", t0.elapsed());
}
