//! Helpers shared by the end-to-end tests: they drive the real `pdguard` binary.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{Rng, SeedableRng};
use serde_json::Value;

pub mod daemon;
pub mod http;
#[allow(unused_imports)]
pub use daemon::{Daemon, Serve};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pdguard")
}

/// Run `pdguard ARGS`, returning its output. The environment's key file is not inherited:
/// tests name keys explicitly.
pub fn pdguard(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("PDGUARD_KEY_FILE")
        .output()
        .unwrap()
}

/// Make a new master key file in `dir` with `pdguard keygen`.
pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let o = pdguard(&["keygen", s(&p)]);
    assert_eq!(code(&o), 0, "keygen: {}", stderr(&o));
    p
}

/// A client command in a controlled environment: the key file, API token file and state
/// directory of the tests' own environment are not inherited; `env` adds variables.
pub fn client(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(bin());
    c.args(args)
        .env_remove("PDGUARD_KEY_FILE")
        .env_remove("PDGUARD_API_TOKEN_FILE")
        .env_remove("PDGUARD_STATE_DIR");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// The JSON answer of a command that must have succeeded.
pub fn json_of(o: &Output) -> Value {
    assert_eq!(code(o), 0, "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Run `pdguard ARGS` and wait at most `limit` for it: its output and how long it took. A
/// command still running then is killed and the test fails ("hangs").
pub fn pdguard_within(limit: std::time::Duration, args: &[&str]) -> (Output, std::time::Duration) {
    let t = std::time::Instant::now();
    let mut child = Command::new(bin())
        .args(args)
        .env_remove("PDGUARD_KEY_FILE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pdguard {args:?} hangs: still running after {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    (child.wait_with_output().unwrap(), t.elapsed())
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// An image of `sectors` sectors of `sector` bytes; each begins with `TAG` and its index.
pub fn tagged_image(path: &Path, sectors: u64, sector: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut img = vec![0u8; sectors as usize * sector];
    rng.fill(&mut img[..]);
    for (i, s) in img.chunks_exact_mut(sector).enumerate() {
        s[..3].copy_from_slice(b"TAG");
        s[3..11].copy_from_slice(&(i as u64).to_le_bytes());
    }
    std::fs::write(path, &img).unwrap();
    img
}

/// The tag of a sector, if it has one.
pub fn tag_of(sector: &[u8]) -> Option<u64> {
    (&sector[..3] == b"TAG").then(|| u64::from_le_bytes(sector[3..11].try_into().unwrap()))
}

pub fn record_of(img: &Path) -> PathBuf {
    let mut s = img.as_os_str().to_owned();
    s.push(".pdguard");
    PathBuf::from(s)
}

/// Digest of a file's bytes, or "absent".
pub fn digest(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(b) => blake3::hash(&b).to_hex().to_string(),
        Err(_) => "absent".into(),
    }
}

/// Image and record digests, to check that a refused command changed nothing.
pub fn state(img: &Path) -> (String, String) {
    (digest(img), digest(&record_of(img)))
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The file's data ranges as the file system reports them (`SEEK_DATA`/`SEEK_HOLE`).
pub fn data_ranges(path: &Path) -> Vec<std::ops::Range<u64>> {
    use pdguard_engine::store::Disk;
    let f = std::fs::File::open(path).unwrap();
    let d = pdguard_engine::store::file::FileDisk::new(f, path.display().to_string()).unwrap();
    d.data_map().unwrap().ranges().to_vec()
}
