//! Instant reclaim over NBD (issue 18, `docs/instant-reclaim.md` section 8), end to end
//! with clients nobody here wrote (qemu-io, qemu-img, libnbd's Python bindings): a sealed
//! disk answers `NBD_OPT_GO` within a second and is served while its migration unseals it;
//! a corrupted sealed region is refused with `EIO`, never served; a daemon killed
//! mid-migration resumes it on restart and keeps every acknowledged, flushed write.
//!
//! The migration is held at a chosen point by the binary's test hook
//! (`PDGUARD_TEST_PAUSE_AT=migrate:BYTES`, `PDGUARD_TEST_PAUSE_FILE`), so that what happens
//! "during the migration" does, whatever the machine's speed.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Fail clearly when a client program is missing (never skip).
fn need(program: &str, package: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: apt-get install {package} (scripts/test.sh installs it)"
    );
    program.to_string()
}

/// Debian's python3 with libnbd's bindings.
fn python() -> &'static str {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "/usr/bin/python3 cannot import nbd: apt-get install python3-libnbd (scripts/test.sh installs it)"
    );
    "/usr/bin/python3"
}

fn client_script() -> String {
    format!("{}/tests/nbd/instant.py", env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &str, args: &[&str]) -> Output {
    let o = Command::new(program).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    o
}

/// A sparse image of `size` bytes with `chunks` MiB of known patterns at random MiB
/// offsets, its copy (the expected image, kept up to date by the test), sealed offline
/// with the secure profile and `--keep-holes` (dense placement: the seal's work follows the
/// data, not the size).
struct Sealed {
    dir: tempfile::TempDir,
    img: PathBuf,
    expect: PathBuf,
    key: PathBuf,
    /// (pattern byte, offset), each 1 MiB long.
    patterns: Vec<(u8, u64)>,
    size: u64,
}

impl Sealed {
    fn new(size: u64, chunks: usize, seed: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("vm.img");
        let expect = dir.path().join("expect.img");
        let key = keygen(dir.path(), "master.key");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(size).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut at: Vec<u64> = Vec::new();
        while at.len() < chunks {
            let m = rng.gen_range(0..size / MIB) * MIB;
            if !at.contains(&m) {
                at.push(m);
            }
        }
        let patterns: Vec<(u8, u64)> = at
            .into_iter()
            .enumerate()
            .map(|(i, off)| (1 + (i % 250) as u8, off))
            .collect();
        for &(p, off) in &patterns {
            f.write_all_at(&vec![p; MIB as usize], off).unwrap();
        }
        f.sync_all().unwrap();
        drop(f);
        run("cp", &["--sparse=always", s(&img), s(&expect)]);
        let o = pdguard(&[
            "image",
            "seal",
            "--key-file",
            s(&key),
            "--keep-holes",
            "--quiet",
            s(&img),
        ]);
        assert_eq!(code(&o), 0, "seal: {}", stderr(&o));
        Self {
            dir,
            img,
            expect,
            key,
            patterns,
            size,
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn sock(&self) -> PathBuf {
        self.state().join("nbd.sock")
    }

    fn pause_file(&self) -> PathBuf {
        self.dir.path().join("paused")
    }

    /// The daemon, its migrations held at `pause` bytes (pass `migrate`) until the pause
    /// file is removed.
    fn daemon(&self, pause: u64) -> Daemon {
        std::fs::create_dir_all(self.state()).unwrap();
        Serve::new(&self.state())
            .args(&["--key-file", s(&self.key), "--grace", "1h"])
            .args(&["--nbd", &format!("unix:{}", s(&self.sock()))])
            .env("PDGUARD_LOG", "info")
            .env("PDGUARD_TEST_PAUSE_AT", format!("migrate:{pause}"))
            .env("PDGUARD_TEST_PAUSE_FILE", self.pause_file())
            .start()
    }

    /// Adopt the sealed image as disk `vm1`: sealed, since its record is beside it.
    fn adopt(&self, d: &Daemon) {
        let size = self.size.to_string();
        d.ok(&[
            "disk",
            "create",
            "vm1",
            "--size",
            &size,
            "--path",
            s(&self.img),
        ]);
        assert_eq!(d.disk("vm1")["state"], "sealed");
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///vm1?socket={}", s(&self.sock()))
    }

    /// Write `len` bytes of `byte` at `off` of the expected image.
    fn expect_write(&self, byte: u8, off: u64, len: u64) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.expect)
            .unwrap();
        f.write_all_at(&vec![byte; len as usize], off).unwrap();
    }

    /// `qemu-img compare` of the disk's file with the expected image.
    fn assert_bit_exact(&self) {
        let qemu_img = need("qemu-img", "qemu-utils");
        let o = Command::new(&qemu_img)
            .args([
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                s(&self.img),
                s(&self.expect),
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "the unsealed disk differs from the expected image: {}{}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        );
        assert!(
            !record_of(&self.img).exists(),
            "the seal record is still there after the migration"
        );
    }
}

/// Wait (bounded) until `path` exists: the migration reached its pause.
fn wait_file(path: &Path, d: &Daemon) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the migration never paused\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let qemu_io = need("qemu-io", "qemu-utils");
    let mut args: Vec<&str> = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(uri);
    let o = run(&qemu_io, &args);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("failed"), "{out}");
    out
}

/// A 4 GiB sealed disk (64 MiB of patterns): `OPT_GO` within a second (the handshake
/// itself, measured by the client), the patterns read right away, writes during the
/// migration, then the migration's end: the disk attached and bit-exact.
#[test]
fn a_sealed_disk_answers_opt_go_within_a_second_and_is_unsealed_behind_its_back() {
    let t_test = Instant::now();
    let py = python();
    let sealed = Sealed::new(4 << 30, 64, 18);
    let d = sealed.daemon(0);
    sealed.adopt(&d);
    let uri = sealed.uri();
    let (p0, off0) = sealed.patterns[0];
    // Connect, OPT_GO, first 4 KiB read; the connection then holds the disk.
    let mut holder = Command::new(py)
        .args([&client_script(), "hold", &uri, &off0.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let first: Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line}\n{}", d.log()));
    let handshake = first["handshake_s"].as_f64().unwrap();
    assert!(
        handshake < 1.0,
        "NBD_OPT_GO on a sealed 4 GiB disk took {handshake:.3} s\n{}",
        d.log()
    );
    assert_eq!(first["first_byte"], u64::from(p0), "{first}");
    assert_eq!(first["uniform"], true, "{first}");
    // The migration holds at its start: what follows happens during it.
    wait_file(&sealed.pause_file(), &d);
    assert_eq!(d.disk("vm1")["state"], "migrating");
    // Every pattern, and zeros where there was nothing, right away.
    let mut reads: Vec<String> = sealed
        .patterns
        .iter()
        .map(|&(p, off)| format!("read -P {p:#x} {off} 1M"))
        .collect();
    for hole in [0u64, 1 << 30, (4 << 30) - MIB] {
        if sealed.patterns.iter().all(|&(_, o)| o != hole) {
            reads.push(format!("read -P 0 {hole} 1M"));
        }
    }
    let out = qemu_io(&uri, &reads);
    assert_eq!(out.matches("read ").count(), reads.len(), "{out}");
    // Writes during the migration: over a pattern's edge, inside a hole, a whole region,
    // an unaligned one; then a flush.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut writes: Vec<(u8, u64, u64)> = vec![
        (0xc1, sealed.patterns[1].1 + MIB - 4096, 8192),
        (0xc2, sealed.patterns[2].1 + MIB, 2 * MIB),
        (0xc3, 512 + 3 * 4096, 1000),
    ];
    for i in 0..8u8 {
        let off = rng.gen_range(0..(4u64 << 30) / 512 - 256) * 512;
        writes.push((0xd0 + i, off, rng.gen_range(1..256u64) * 512));
    }
    let mut cmds: Vec<String> = writes
        .iter()
        .map(|(p, o, l)| format!("write -P {p:#x} {o} {l}"))
        .collect();
    cmds.push("flush".into());
    qemu_io(&uri, &cmds);
    for &(p, o, l) in &writes {
        sealed.expect_write(p, o, l);
    }
    // Read back during the migration.
    let back: Vec<String> = writes
        .iter()
        .map(|(p, o, l)| format!("read -P {p:#x} {o} {l}"))
        .collect();
    qemu_io(&uri, &back);
    assert_eq!(d.disk("vm1")["state"], "migrating");
    std::fs::remove_file(sealed.pause_file()).unwrap();
    // Held by the first connection: attached at the end.
    d.wait_state("vm1", "attached", 50);
    drop(holder.stdin.take());
    let _ = holder.wait();
    sealed.assert_bit_exact();
    assert!(
        d.log().contains("instant reclaim: the migration ended"),
        "{}",
        d.log()
    );
    eprintln!(
        "OPT_GO {handshake:.3} s, first 4 KiB read {:.3} s, test {:.1} s",
        first["first_read_s"].as_f64().unwrap_or(0.0),
        t_test.elapsed().as_secs_f64()
    );
}

/// A sealed sector corrupted after the seal: its region is refused with `EIO` when read —
/// the client gets none of its bytes — every later request too, and the disk is `failed`
/// naming the region.
#[test]
fn a_corrupted_sealed_region_is_refused_with_eio_never_served() {
    let py = python();
    let sealed = Sealed::new(64 * MIB, 16, 3);
    // Sealed sector 5 holds data (dense placement puts the data first) and is not one of
    // the sectors the record's fingerprint samples (0, (N-1)/7, ...).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&sealed.img)
        .unwrap();
    f.write_all_at(&[0xee; 16], 5 * 512 + 40).unwrap();
    f.sync_all().unwrap();
    let d = sealed.daemon(0);
    sealed.adopt(&d);
    let out = sealed.dir.path().join("read.img");
    let o = run(
        py,
        &[
            &client_script(),
            "regions",
            &sealed.uri(),
            s(&out),
            &MIB.to_string(),
        ],
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let refused = v["refused"].as_array().unwrap();
    assert!(
        !refused.is_empty(),
        "the corrupted region was served\n{}",
        d.log()
    );
    let first = refused[0]["chunk"].as_u64().unwrap();
    // EIO (5), then every later chunk refused too; every chunk before it served right.
    for r in refused {
        assert_eq!(r["errno"], 5, "{r}");
    }
    let chunks = 64;
    assert_eq!(refused.len() as u64, chunks - first, "{v}");
    let got = std::fs::read(&out).unwrap();
    let want = std::fs::read(&sealed.expect).unwrap();
    let served = (first * MIB) as usize;
    assert!(got[..served] == want[..served], "a served region differs");
    std::fs::remove_file(sealed.pause_file()).unwrap();
    let v = d.wait_state("vm1", "failed", 30);
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("region {first} ")),
        "the failure does not name region {first}: {error}"
    );
    assert!(record_of(&sealed.img).exists());
}

/// The seal record's phase (`pdguard image inspect`).
fn phase(img: &Path) -> String {
    let o = pdguard(&["image", "inspect", "--json", s(img)]);
    assert_eq!(code(&o), 0, "inspect: {}", stderr(&o));
    json_of(&o)["phase"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `kill -9` of the daemon mid-migration after writes were acknowledged and flushed; the
/// restarted daemon resumes the migration at start (nobody holds the disk: it ends in the
/// grace period), and the disk is bit-exact: the plaintext plus every flushed write.
#[test]
fn a_daemon_killed_mid_migration_resumes_it_and_keeps_every_flushed_write() {
    let py = python();
    let sealed = Sealed::new(1 << 30, 32, 5);
    // Held after about 100 MiB of the migration's windows (the evacuation of the data and a
    // first move window).
    let mut d = sealed.daemon(100 * MIB);
    sealed.adopt(&d);
    let uri = sealed.uri();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut first = true;
    let mut writes = Vec::new();
    while !sealed.pause_file().exists() || first {
        first = false;
        let off = rng.gen_range(0..(1u64 << 30) / 512 - 64) * 512;
        let len = rng.gen_range(1..64u64) * 512;
        let byte = 0x20 + writes.len() as u8 % 200;
        run(
            py,
            &[
                &client_script(),
                "write",
                &uri,
                &off.to_string(),
                &len.to_string(),
                &byte.to_string(),
            ],
        );
        writes.push((byte, off, len));
        if writes.len() > 200 {
            wait_file(&sealed.pause_file(), &d);
        }
    }
    // A few more while it is held mid-way, each acknowledged and flushed.
    for (i, off) in [3 * MIB + 7 * 512, 700 * MIB, (1 << 30) - 4096]
        .into_iter()
        .enumerate()
    {
        let byte = 0xe0 + i as u8;
        run(
            py,
            &[
                &client_script(),
                "write",
                &uri,
                &off.to_string(),
                "4096",
                &byte.to_string(),
            ],
        );
        writes.push((byte, off, 4096));
    }
    assert_eq!(d.disk("vm1")["state"], "migrating");
    d.kill9();
    assert_eq!(phase(&sealed.img), "migrating");
    for &(p, o, l) in &writes {
        sealed.expect_write(p, o, l);
    }
    std::fs::remove_file(sealed.pause_file()).unwrap();
    d.restart();
    // Resumed at start (nobody reconnected); its pause is let go whenever it comes.
    let t0 = Instant::now();
    loop {
        let _ = std::fs::remove_file(sealed.pause_file());
        let v = d.disk("vm1");
        if v["state"] == "grace" {
            break;
        }
        assert_ne!(v["state"], "failed", "{v}\n{}", d.log());
        assert!(
            t0.elapsed() < Duration::from_secs(50),
            "the migration did not end after the restart: {v}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        d.log().contains("resuming migrate of vm1"),
        "the restart did not resume the migration at start\n{}",
        d.log()
    );
    sealed.assert_bit_exact();
    let _ = std::io::stdout().flush();
}
