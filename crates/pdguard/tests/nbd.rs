//! End-to-end tests of the NBD export (`pdguard serve --nbd`) with real clients nobody here
//! wrote — qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh/libnbd, fio — and with raw bytes
//! from a socket. The clients come from Debian packages (qemu-utils, libnbd-bin,
//! python3-libnbd, fio; scripts/test.sh installs them): a missing one fails the test.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// A daemon serving NBD on STATE/nbd.sock (and wherever `extra` says), logging at info.
struct Nbd {
    d: Daemon,
    sock: PathBuf,
}

impl std::ops::Deref for Nbd {
    type Target = Daemon;

    fn deref(&self) -> &Daemon {
        &self.d
    }
}

impl Nbd {
    fn start(state: &Path, extra: &[&str]) -> Self {
        let sock = state.join("nbd.sock");
        // Made here with the umask's mode: the sockets' own modes keep others out.
        std::fs::create_dir_all(state).unwrap();
        let d = Serve::new(state)
            .args(&["--nbd", &format!("unix:{}", sock.display())])
            .args(extra)
            .env("PDGUARD_LOG", "info")
            .start();
        Self { d, sock }
    }

    fn create(&self, name: &str, size: &str) -> PathBuf {
        let v = self.ok(&["disk", "create", name, "--size", size]);
        PathBuf::from(v["path"].as_str().unwrap())
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

/// Fail clearly when a client program is missing (never skip).
fn need(program: &str, package: &str) -> &'static str {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: apt-get install {package} (scripts/test.sh installs it)"
    );
    Box::leak(program.to_string().into_boxed_str())
}

/// Debian's python3 with libnbd's bindings (not a pyenv one that lacks them).
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

fn script(name: &str) -> String {
    format!("{}/tests/nbd/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

#[test]
fn qemu_io_patterns_survive_a_daemon_restart() {
    let qemu_io = need("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("st");
    let args = ["--profile", "patent", "--grace", "1h"];
    let d = Nbd::start(&state, &args);
    d.create("vm1", "64M");
    let uri = d.uri("vm1");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // 0xab over the first MiB, then patterns at random 4 KiB-aligned offsets past it.
    let mut writes = vec![(0xabu8, 0u64, 1u64 << 20)];
    for i in 0..16u8 {
        let off = rng.gen_range(256..16384u64) * 4096;
        let len = rng.gen_range(1..16u64) * 4096;
        if writes
            .iter()
            .all(|&(_, o, l)| off + len <= o || o + l <= off)
        {
            writes.push((0x10 + i, off, len));
        }
    }
    let mut cmds = Vec::new();
    for (p, o, l) in &writes {
        cmds.push("-c".to_string());
        cmds.push(format!("write -P {p:#x} {o} {l}"));
    }
    let reads: Vec<String> = writes
        .iter()
        .flat_map(|(p, o, l)| ["-c".to_string(), format!("read -P {p:#x} {o} {l}")])
        .chain(["-c".into(), "read -P 0 1M 64k".into()])
        .collect();
    let args_of = |v: &[String]| {
        let mut a: Vec<&str> = vec!["-f", "raw"];
        a.extend(v.iter().map(String::as_str));
        a.push(&uri);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let w = args_of(&cmds);
    run(qemu_io, &w.iter().map(String::as_str).collect::<Vec<_>>());
    let r = args_of(&reads);
    let r: Vec<&str> = r.iter().map(String::as_str).collect();
    let o = run(qemu_io, &r);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), writes.len() + 1, "{out}");
    // Kill the daemon while a client is connected; the new one serves the same bytes, and
    // the association of the connection that died with the old process is gone: the disk
    // is in its grace period.
    let mut idle = Command::new(python())
        .args([
            "-c",
            "import nbd,sys,time\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint('up',flush=True)\ntime.sleep(60)",
            &uri,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = [0u8; 3];
    idle.stdout.take().unwrap().read_exact(&mut up).unwrap();
    assert_eq!(d.disk("vm1")["containers"].as_array().unwrap().len(), 1);
    drop(d);
    let _ = idle.kill();
    let _ = idle.wait();
    let d = Nbd::start(&state, &args);
    let v = d.disk("vm1");
    assert_eq!(v["containers"], serde_json::json!([]), "{v}");
    assert_eq!(v["state"], "grace", "{v}");
    let o = run(qemu_io, &r);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), writes.len() + 1, "{out}");
}

#[test]
fn qemu_img_info_convert_and_compare() {
    let qemu_img = need("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let d = Nbd::start(&dir.path().join("st"), &["--profile", "patent"]);
    let disk = d.create("img", "16M");
    let uri = d.uri("img");
    let o = run(qemu_img, &["info", "--output=json", &uri]);
    let info: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["virtual-size"], 16 << 20, "{info}");
    // Into the export, then compare it with the source and with the disk file.
    let src = dir.path().join("src.img");
    let data = random_bytes(16 << 20, 3);
    std::fs::write(&src, &data).unwrap();
    run(
        qemu_img,
        &["convert", "-n", "-f", "raw", "-O", "raw", s(&src), &uri],
    );
    run(
        qemu_img,
        &["compare", "-f", "raw", "-F", "raw", s(&src), &uri],
    );
    run(
        qemu_img,
        &["compare", "-f", "raw", "-F", "raw", s(&disk), &uri],
    );
    assert!(std::fs::read(&disk).unwrap() == data);
    // Out of the export into a new file.
    let back = dir.path().join("back.img");
    run(
        qemu_img,
        &["convert", "-f", "raw", "-O", "raw", &uri, s(&back)],
    );
    assert!(std::fs::read(&back).unwrap() == data);
}

#[test]
fn nbdinfo_lists_exports_and_maps_holes() {
    let nbdinfo = need("nbdinfo", "libnbd-bin");
    let qemu_io = need("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let d = Nbd::start(&dir.path().join("st"), &["--profile", "patent"]);
    d.create("alpha", "8M");
    d.create("beta", "4M");
    let list = format!("nbd+unix:///?socket={}", d.sock.display());
    let o = run(nbdinfo, &["--list", "--json", &list]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["protocol"], "newstyle-fixed", "{v}");
    let exports = v["exports"].as_array().unwrap();
    let by_name = |n: &str| {
        exports
            .iter()
            .find(|e| e["export-name"] == n)
            .unwrap_or_else(|| panic!("{n} not listed: {v}"))
    };
    assert_eq!(by_name("alpha")["export-size"], 8 << 20);
    assert_eq!(by_name("beta")["export-size"], 4 << 20);
    assert_eq!(
        by_name("alpha")["contexts"],
        serde_json::json!(["base:allocation"])
    );
    assert_eq!(by_name("alpha")["block_size_maximum"], 32 << 20);
    // Listing is not an association.
    assert_eq!(d.disk("alpha")["state"], "available");
    // Data at 1 MiB..1.5 MiB, holes around it.
    run(
        qemu_io,
        &["-f", "raw", "-c", "write -P 0x5a 1M 512k", &d.uri("alpha")],
    );
    let o = run(nbdinfo, &["--map", "--json", &d.uri("alpha")]);
    let map: Value = serde_json::from_slice(&o.stdout).unwrap();
    let extents: Vec<(u64, u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        extents,
        vec![
            (0, 1 << 20, 3),
            (1 << 20, 512 << 10, 0),
            (3 << 19, (8 << 20) - (3 << 19), 3)
        ],
        "{map}"
    );
}

#[test]
fn nbdcopy_round_trip_of_256_mib() {
    let nbdcopy = need("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let d = Nbd::start(&dir.path().join("st"), &["--profile", "patent"]);
    let disk = d.create("big", "256M");
    let src = dir.path().join("src.img");
    let mut data = random_bytes(256 << 20, 5);
    // A run of zeros in the middle, which nbdcopy may send as WRITE_ZEROES.
    data[64 << 20..80 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    run(nbdcopy, &[s(&src), &d.uri("big")]);
    let back = dir.path().join("back.img");
    run(nbdcopy, &[&d.uri("big"), s(&back)]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "nbdcopy round trip differs"
    );
    assert!(
        std::fs::read(&disk).unwrap() == data,
        "the disk file differs"
    );
}

#[test]
fn nbdsh_bad_requests_get_errors_and_every_command_works() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let d = Nbd::start(&dir.path().join("st"), &["--profile", "patent"]);
    d.create("p", "32M");
    let o = run(
        py,
        &[
            &script("protocol.py"),
            s(&d.sock),
            "p",
            &(32u64 << 20).to_string(),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "OK");
}

#[test]
fn fio_random_writes_with_32_in_flight_verify() {
    let fio = need("fio", "fio");
    let dir = tempfile::tempdir().unwrap();
    let d = Nbd::start(&dir.path().join("st"), &["--profile", "patent"]);
    d.create("fio", "64M");
    let uri = format!("--uri={}", d.uri("fio"));
    let o = run(
        fio,
        &[
            "--name=verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=64M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    // fio's nbd engine prints a line of its own before the JSON.
    let out = String::from_utf8_lossy(&o.stdout);
    let v: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 64 << 20, "{job}");
    assert_eq!(
        job["read"]["io_bytes"],
        64 << 20,
        "verify read everything back"
    );
}

// ---- raw bytes ------------------------------------------------------------------------

const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

struct Raw(UnixStream);

impl Raw {
    /// Connect and do the initial exchange: greeting, client flags (FIXED_NEWSTYLE|NO_ZEROES).
    fn connect(sock: &Path) -> Self {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            3,
            "FIXED_NEWSTYLE|NO_ZEROES"
        );
        s.write_all(&3u32.to_be_bytes()).unwrap();
        Self(s)
    }

    fn option(&mut self, code: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_vec();
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }

    /// One option reply: (option, type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        self.0.read_exact(&mut d).unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            d,
        )
    }

    /// `NBD_OPT_GO` on `name` without structured replies; returns the export size.
    fn go(&mut self, name: &str) -> u64 {
        self.option(7, &info_data(name, &[]));
        let mut size = None;
        loop {
            let (opt, rtype, d) = self.option_reply();
            assert_eq!(opt, 7);
            match rtype {
                3 if d[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap()))
                }
                3 => {}
                1 => return size.expect("NBD_INFO_EXPORT before the ACK"),
                other => panic!("OPT_GO failed: {other:#x} {}", String::from_utf8_lossy(&d)),
            }
        }
    }

    fn request(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }

    /// A simple reply: (error, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes());
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// True when the server closed the connection (a read timeout is not a close).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.0.read(&mut b) {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

const ERR_UNSUP: u32 = (1 << 31) + 1;
const ERR_INVALID: u32 = (1 << 31) + 3;
const ERR_UNKNOWN: u32 = (1 << 31) + 6;

#[test]
fn raw_bytes_options_and_malformed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let d = Nbd::start(&dir.path().join("st"), &["--profile", "patent"]);
    d.create("raw", "1M");
    let mut c = Raw::connect(&d.sock);
    // Unknown options, STARTTLS and EXTENDED_HEADERS: ERR_UNSUP, and haggling goes on.
    for code in [42u32, 5, 11, 0xffff_ffff] {
        c.option(code, b"whatever");
        let (opt, rtype, _) = c.option_reply();
        assert_eq!((opt, rtype), (code, ERR_UNSUP));
    }
    // LIST with data, GO with a name length past the data, a truncated info list, an
    // unknown export, a bad meta context request before structured replies.
    c.option(3, b"x");
    assert_eq!(c.option_reply().1, ERR_INVALID);
    let mut bad = info_data("raw", &[]);
    bad[3] = 200;
    c.option(7, &bad);
    assert_eq!(c.option_reply().1, ERR_INVALID);
    let mut short = info_data("raw", &[3]);
    short.pop();
    c.option(6, &short);
    assert_eq!(c.option_reply().1, ERR_INVALID);
    c.option(7, &info_data("nope", &[]));
    let (_, rtype, msg) = c.option_reply();
    assert_eq!(rtype, ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("nope"));
    c.option(10, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(c.option_reply().1, ERR_INVALID);
    assert_eq!(d.disk("raw")["state"], "available", "no association yet");
    // Transmission with simple replies.
    assert_eq!(c.go("raw"), 1 << 20);
    assert_eq!(d.disk("raw")["state"], "attached");
    let users = d.disk("raw")["containers"].clone();
    assert!(
        users[0].as_str().unwrap().starts_with("nbd:unix"),
        "{users}"
    );
    // Out of range, overflowing, zero length, unknown command, bad flags, FLUSH with a
    // length: each an error reply with its cookie, and the connection lives on.
    c.request(0, 0, 1, 1 << 20, 512, &[]);
    assert_eq!(c.simple_reply(), (22, 1));
    c.request(0, 0, 2, u64::MAX - 10, 512, &[]);
    assert_eq!(c.simple_reply(), (22, 2));
    c.request(0, 1, 3, (1 << 20) - 256, 512, &[7u8; 512]);
    assert_eq!(c.simple_reply(), (28, 3), "WRITE past the end is ENOSPC");
    c.request(0, 0, 4, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (22, 4));
    c.request(0, 99, 5, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (22, 5));
    c.request(1 << 9, 0, 6, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (22, 6));
    c.request(0, 3, 7, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (22, 7));
    c.request(0, 7, 8, 0, 512, &[]);
    assert_eq!(
        c.simple_reply(),
        (22, 8),
        "BLOCK_STATUS without a meta context"
    );
    // Pipelined: 16 writes then 16 reads sent before reading any reply.
    for i in 0..16u64 {
        c.request(0, 1, 100 + i, i * 4096, 4096, &[i as u8; 4096]);
    }
    let mut cookies: Vec<u64> = (0..16)
        .map(|_| c.simple_reply())
        .map(|(e, k)| {
            assert_eq!(e, 0);
            k
        })
        .collect();
    cookies.sort();
    assert_eq!(cookies, (100..116).collect::<Vec<_>>());
    for i in 0..16u64 {
        c.request(0, 0, 200 + i, i * 4096, 4096, &[]);
    }
    for _ in 0..16 {
        let (e, k) = c.simple_reply();
        assert_eq!(e, 0);
        let mut data = vec![0u8; 4096];
        c.0.read_exact(&mut data).unwrap();
        assert!(
            data.iter().all(|&b| b == (k - 200) as u8),
            "read {k} has the wrong data"
        );
    }
    // A WRITE larger than the export (and than the advertised maximum payload) is refused
    // with ENOSPC after its payload was read and discarded; the connection lives on.
    c.request(0, 1, 9, 0, (33 << 20) + 1, &vec![0xee; (33 << 20) + 1]);
    assert_eq!(c.simple_reply(), (28, 9));
    c.request(0, 0, 10, 0, 4096, &[]);
    assert_eq!(c.simple_reply(), (0, 10));
    let mut data = vec![0u8; 4096];
    c.0.read_exact(&mut data).unwrap();
    assert!(
        data.iter().all(|&b| b == 0),
        "the refused write reached the disk"
    );
    c.request(0, 2, 11, 0, 0, &[]);
    assert!(c.closed());
    // Bad request magic closes it too.
    let mut c = Raw::connect(&d.sock);
    c.go("raw");
    c.0.write_all(&[0u8; 28]).unwrap();
    assert!(c.closed());
    // Bad client flags close the connection during the handshake.
    let mut s = UnixStream::connect(&d.sock).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0x80u32.to_be_bytes()).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    // An option longer than the limit closes it.
    let mut c = Raw::connect(&d.sock);
    let mut b = IHAVEOPT.to_vec();
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.0.write_all(&b).unwrap();
    assert!(c.closed());
    // NBD_OPT_EXPORT_NAME with an unknown name closes it (no error reply exists).
    let mut c = Raw::connect(&d.sock);
    c.option(1, b"nope");
    assert!(c.closed());
    // The server is still fine, and every connection's association has ended.
    let mut c = Raw::connect(&d.sock);
    c.option(1, b"raw");
    let mut r = [0u8; 10];
    c.0.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 1 << 20);
    c.request(0, 0, 1, 0, 4096, &[]);
    assert_eq!(c.simple_reply(), (0, 1));
    let mut data = vec![0u8; 4096];
    c.0.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0));
    c.request(0, 2, 2, 0, 0, &[]);
    assert!(c.closed());
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.disk("raw")["containers"] != serde_json::json!([]) {
        assert!(
            Instant::now() < deadline,
            "associations left: {}",
            d.disk("raw")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- the gate -------------------------------------------------------------------------

fn block(i: u64) -> Vec<u8> {
    let head = format!("W{i:08}");
    head.as_bytes().iter().cycle().take(4096).copied().collect()
}

/// (index, status, start, end) of every write the writer script made.
fn writes_of(out: &Path) -> Vec<(u64, String, f64, f64)> {
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v[0].as_u64().unwrap(),
                v[1].as_str().unwrap().to_string(),
                v[2].as_f64().unwrap(),
                v[3].as_f64().unwrap(),
            )
        })
        .collect()
}

/// A client writes block after block while an admin force-seals the disk: its writes are
/// held during the seal, then refused with EPERM; the sealed bytes do not change while it
/// keeps trying; after the unseal (digest checked) every acknowledged write is there and
/// no refused one is. A write applied between the seal's first read and the unseal would
/// either be lost (an acknowledged write missing), or change the sealed bytes (the unseal's
/// digest check fails, or the sealed file's hash changes), or show up after the unseal.
#[test]
fn force_seal_holds_then_refuses_writes_and_loses_none() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let d = Nbd::start(
        &dir.path().join("st"),
        &["--sealed-io", "refuse", "--grace", "1h"],
    );
    let disk = d.create("g", "64M");
    // Data everywhere, so that the seal takes a while and moves every sector.
    let mut base = random_bytes(64 << 20, 9);
    let blocks = 4096u64; // the writer's 16 MiB; the rest keeps its random bytes
    for i in 0..blocks {
        base[(i * 4096) as usize..((i + 1) * 4096) as usize].fill(0);
    }
    std::fs::write(&disk, &base).unwrap();
    let out = dir.path().join("writes.jsonl");
    let mut writer = Command::new(py)
        .args([
            &script("writer.py"),
            s(&d.sock),
            "g",
            &blocks.to_string(),
            s(&out),
            "30",
        ])
        .spawn()
        .unwrap();
    // Let it write for a while, and check it is associated.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !out.exists() || writes_of(&out).len() < 200 {
        assert!(Instant::now() < deadline, "the writer did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.disk("g")["state"], "attached");
    // Without --force the API refuses: the disk is in use.
    let o = d.cli(&["disk", "seal", "g"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    let t_seal = Instant::now();
    d.ok(&["disk", "seal", "g", "--force"]);
    let sealed_hash = digest(&disk);
    let seal_secs = t_seal.elapsed().as_secs_f64();
    assert!(writer.wait().unwrap().success());
    // Nothing changed the sealed bytes while the writer kept trying.
    assert_eq!(digest(&disk), sealed_hash);
    let w = writes_of(&out);
    let first_refused = w
        .iter()
        .position(|x| x.1 != "ok")
        .expect("no write was refused");
    assert!(first_refused >= 200);
    assert!(
        w[first_refused..].iter().all(|x| x.1 == "EPERM"),
        "{:?}",
        &w[first_refused..]
    );
    // The write that met the closed gate was held (for a good part of the seal), then
    // refused.
    let held = w[first_refused].3 - w[first_refused].2;
    assert!(
        held > 0.05 && held > seal_secs / 4.0,
        "first refused write took {held:.3}s, the seal {seal_secs:.3}s"
    );
    // Unseal (digest checked); the association ended when the writer left.
    d.ok(&["disk", "unseal", "g"]);
    let after = std::fs::read(&disk).unwrap();
    for (i, st, _, _) in &w {
        let got = &after[(*i * 4096) as usize..(*i as usize + 1) * 4096];
        if st == "ok" {
            assert!(
                got == block(*i),
                "acknowledged write {i} is missing after the unseal"
            );
        } else {
            assert!(
                got.iter().all(|&b| b == 0),
                "refused write {i} reached the disk"
            );
        }
    }
    let tail = (blocks * 4096) as usize;
    assert!(
        after[tail..] == base[tail..],
        "bytes the writer never touched changed"
    );
}

/// With `--sealed-io read-only`, a force-sealed disk answers reads with the sealed bytes
/// and refuses writes; a request that waits too long at a blocked gate gets EIO.
#[test]
fn sealed_read_only_and_hold_timeout() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let d = Nbd::start(
        &dir.path().join("st"),
        &[
            "--sealed-io",
            "read-only",
            "--nbd-hold",
            "1ms",
            "--profile",
            "patent",
        ],
    );
    let disk = d.create("ro", "64M");
    let original = random_bytes(64 << 20, 4);
    std::fs::write(&disk, &original).unwrap();
    let out = dir.path().join("writes.jsonl");
    let read_out = dir.path().join("read.bin");
    let mut writer = Command::new(py)
        .args([
            &script("writer.py"),
            s(&d.sock),
            "ro",
            "4096",
            s(&out),
            "10",
            s(&read_out),
        ])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !out.exists() || writes_of(&out).len() < 50 {
        assert!(Instant::now() < deadline, "the writer did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.ok(&["disk", "seal", "ro", "--force"]);
    assert!(writer.wait().unwrap().success());
    let w = writes_of(&out);
    let failed: Vec<&str> = w
        .iter()
        .filter(|x| x.1 != "ok")
        .map(|x| x.1.as_str())
        .collect();
    assert!(
        failed.contains(&"EIO"),
        "no write timed out at the blocked gate: {failed:?}"
    );
    assert_eq!(failed.last(), Some(&"EPERM"), "{failed:?}");
    assert!(
        failed.iter().all(|s| *s == "EPERM" || *s == "EIO"),
        "{failed:?}"
    );
    // The read over the same connection, after the seal, saw the sealed bytes.
    let sealed = std::fs::read(&disk).unwrap();
    let read = std::fs::read(&read_out).unwrap();
    assert!(
        read == sealed[32 << 20..33 << 20],
        "a read-only sealed read differs from the disk"
    );
    assert!(
        read != original[32 << 20..33 << 20],
        "the disk was not sealed"
    );
}

/// The data path makes the associations: the last connection's close starts the grace
/// period, then the disk is dangling and sealed; listing it is no reclaim; a new
/// `NBD_OPT_GO` is one: it waits for the unseal and gets the data back, bit-exact.
#[test]
fn disconnect_grace_seal_and_opt_go_reclaims_bit_exact() {
    let nbdcopy = need("nbdcopy", "libnbd-bin");
    let nbdinfo = need("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let d = Nbd::start(&dir.path().join("st"), &["--grace", "1s"]);
    let disk = d.create("vm", "16M");
    let src = dir.path().join("src.img");
    let data = random_bytes(16 << 20, 21);
    std::fs::write(&src, &data).unwrap();
    run(nbdcopy, &[s(&src), &d.uri("vm")]);
    assert!(std::fs::read(&disk).unwrap() == data);
    d.wait_state("vm", "grace", 10);
    let v = d.wait_state("vm", "sealed", 30);
    assert_eq!(v["dangling"], true, "{v}");
    assert!(
        std::fs::read(&disk).unwrap() != data,
        "the disk was not sealed"
    );
    let list = format!("nbd+unix:///?socket={}", d.sock.display());
    run(nbdinfo, &["--list", &list]);
    assert_eq!(d.disk("vm")["state"], "sealed", "listing must not reclaim");
    let back = dir.path().join("back.img");
    run(nbdcopy, &[&d.uri("vm"), s(&back)]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "reclaimed data differs"
    );
    assert!(std::fs::read(&disk).unwrap() == data);
    let v = d.disk("vm");
    assert_eq!(v["dangling"], false, "{v}");
    // Reclaimed: still migrating (instant reclaim, the default) or unsealed, never sealed.
    assert!(
        matches!(
            v["state"].as_str(),
            Some("grace" | "attached" | "migrating")
        ),
        "{v}"
    );
}

/// TCP without TLS is refused at start (exit 2, naming the fix) unless the operator says
/// --nbd-insecure-tcp; then loopback works (port 0: the daemon prints the port it got)
/// with a warning in the log, and another address still needs --nbd-allow-remote.
#[test]
fn tcp_without_tls_needs_insecure_tcp_and_remote_needs_a_flag() {
    let qemu_io = need("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let refuse = |args: &[&str], words: &[&str]| {
        let st = dir.path().join("st0");
        let o = Serve::new(&st).args(args).refused();
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
        for w in words {
            assert!(
                stderr(&o).contains(w),
                "{args:?}: no {w:?} in {}",
                stderr(&o)
            );
        }
        assert!(!st.exists(), "a refused start made {}", st.display());
    };
    refuse(
        &["--nbd", "tcp:127.0.0.1:0"],
        &["--nbd-tls-certs", "--nbd-tls-psk", "--nbd-insecure-tcp"],
    );
    refuse(
        &["--nbd", "tcp:0.0.0.0:0", "--nbd-insecure-tcp"],
        &["clear text", "--nbd-allow-remote"],
    );
    refuse(&["--nbd-tls", "require"], &["--nbd-tls-psk"]);
    let state = dir.path().join("st");
    let d = Nbd::start(
        &state,
        &[
            "--profile",
            "patent",
            "--nbd",
            "tcp:127.0.0.1:0",
            "--nbd-insecure-tcp",
        ],
    );
    d.create("t", "4M");
    let log = d.log();
    assert!(log.contains("without TLS"), "{log}");
    let addr = tcp_addr(&d);
    let uri = format!("nbd://{addr}/t");
    run(qemu_io, &["-f", "raw", "-c", "write -P 0x77 0 64k", &uri]);
    let o = run(qemu_io, &["-f", "raw", "-c", "read -P 0x77 0 64k", &uri]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("verification failed"));
}

/// The TCP address the daemon printed.
fn tcp_addr(d: &Daemon) -> String {
    let log = d.log();
    log.lines()
        .find_map(|l| l.strip_prefix("pdguard: serving NBD on tcp:"))
        .unwrap_or_else(|| panic!("no TCP listener in the log: {log}"))
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

#[path = "nbd/hosts.rs"]
mod hosts;
