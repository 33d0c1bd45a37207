//! Issue 9, item 3: a crypto-erase that erases. An image sealed (secure profile) inside a
//! real ext4 file system on a loop device is shredded; then no copy of its wrapped key, in
//! any encoding pdguard uses, is left anywhere on the file system's raw bytes, and nothing
//! unseals it, not even its old record written back. Needs root (loop devices, mount) and
//! e2fsprogs (`mkfs.ext4`; scripts/test.sh installs it).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (install it: scripts/test.sh does): {e}"))
}

fn must(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed (this test needs root and loop devices): {}",
        stderr(&o)
    );
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

/// A loop device attached to a backing file; detached when dropped, even on failure.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run("losetup", &["-d", &self.0]);
    }
}

/// A mounted file system; unmounted when dropped, even on failure.
struct Mount(Option<PathBuf>);

impl Mount {
    fn new(dev: &str, at: &Path) -> Self {
        must("mount", &["-t", "ext4", dev, s(at)]);
        Self(Some(at.to_path_buf()))
    }

    fn unmount(&mut self) {
        if let Some(at) = self.0.take() {
            must("sync", &[]);
            must("umount", &[s(&at)]);
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(at) = self.0.take() {
            let _ = run("umount", &["-l", s(&at)]);
        }
    }
}

/// The wrapped key (nonce and ciphertext) of a key-slot file, as `docs/seal-record.md`
/// lays the slot out: nonce at bytes 40..52, ciphertext length (u32 LE) at 52..56, the
/// ciphertext from 56.
fn wrapped_key_of(slot: &[u8]) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(&slot[..16], b"PDGUARD-KEYSLOT1", "not a key slot");
    let len = u32::from_le_bytes(slot[52..56].try_into().unwrap()) as usize;
    (slot[40..52].to_vec(), slot[56..56 + len].to_vec())
}

/// Every byte string that would give the wrapped key away: the raw ciphertext and its
/// lowercase and uppercase hex, whole, and each 16-byte piece of the raw ciphertext (a
/// partial copy is a leak too).
fn needles(nonce: &[u8], ct: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut v = vec![
        ("raw ciphertext".to_string(), ct.to_vec()),
        ("hex ciphertext".into(), hex(ct).into_bytes()),
        ("HEX ciphertext".into(), hex(ct).to_uppercase().into_bytes()),
        ("raw nonce+ciphertext".into(), [nonce, ct].concat()),
    ];
    for (k, piece) in ct.chunks(16).enumerate().filter(|(_, p)| p.len() == 16) {
        v.push((format!("raw ciphertext piece {k}"), piece.to_vec()));
    }
    v
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn after_shred_no_copy_of_the_wrapped_key_is_on_the_raw_device() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("fs.img");
    fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    must("mkfs.ext4", &["-q", "-F", s(&backing)]);
    let lo = Loop(must("losetup", &["--find", "--show", s(&backing)]));
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut mount = Mount::new(&lo.0, &mnt);

    let key = keygen(dir.path(), "master.key");
    let img = mnt.join("disk.img");
    tagged_image(&img, 2048, 512, 21); // 1 MiB
    let o = pdguard(&["image", "seal", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 0, "seal: {}", stderr(&o));
    let slot_path = mnt.join("disk.img.pdguard.key");
    let slot = fs::read(&slot_path).unwrap();
    let (nonce, ct) = wrapped_key_of(&slot);
    assert!(ct.len() >= 48, "a wrapped key of {} bytes", ct.len());
    let needles = needles(&nonce, &ct);
    let record = fs::read(record_of(&img)).unwrap();
    for (what, n) in &needles {
        assert!(find(&record, n).is_none(), "the record holds the {what}");
    }

    // Positive control: before the shred, the search finds the key on the raw bytes.
    must("sync", &[]);
    let raw = fs::read(&backing).unwrap();
    assert!(
        find(&raw, &ct).is_some(),
        "the search cannot even find the live key slot on the raw device"
    );

    let o = pdguard(&["image", "shred", s(&img), "--yes", "--key-file", s(&key)]);
    assert_eq!(code(&o), 0, "shred: {}", stderr(&o));
    assert!(!slot_path.exists(), "the key slot survived the shred");
    mount.unmount();

    let raw = fs::read(&backing).unwrap();
    let found: Vec<String> = needles
        .iter()
        .filter_map(|(what, n)| find(&raw, n).map(|at| format!("{what} at byte {at}")))
        .collect();
    assert!(
        found.is_empty(),
        "after shred the raw device still holds: {}",
        found.join(", ")
    );

    // Nothing unseals it: not the master key, not the record as it was before the shred.
    let mut mount = Mount::new(&lo.0, &mnt);
    let o = pdguard(&["image", "unseal", s(&img), "--key-file", s(&key)]);
    assert_eq!(code(&o), 1, "unseal after shred: {}", stderr(&o));
    assert!(stderr(&o).contains("crypto-erased"), "{}", stderr(&o));
    let o = pdguard(&["image", "inspect", s(&img)]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("shredded"));
    fs::write(record_of(&img), &record).unwrap();
    let sealed = digest(&img);
    let o = pdguard(&["image", "unseal", s(&img), "--key-file", s(&key)]);
    assert_eq!(
        code(&o),
        1,
        "unseal with the rebuilt record: {}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("key slot"), "{}", stderr(&o));
    assert_eq!(digest(&img), sealed, "a failed unseal changed the image");
    mount.unmount();
}

/// A shred stopped after the record says `shredding` is recognisable and resumable: every
/// command names it and the fix, `inspect` still reads the record, and `shred` finishes it.
#[test]
fn an_interrupted_shred_is_named_and_finished_by_shred() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    let img = dir.path().join("disk.img");
    tagged_image(&img, 256, 512, 22);
    let o = pdguard(&["image", "seal", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Replay what shred's first durable step writes: the record in phase `shredding`
    // (without the key, so with no MAC, as a shred run without the key file writes it).
    let rec = record_of(&img);
    let text = fs::read_to_string(&rec).unwrap();
    let (header, body) = text.split_once('\n').unwrap();
    let mut v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["phase"] = "shredding".into();
    v.as_object_mut().unwrap().remove("plain_digest");
    v.as_object_mut().unwrap().remove("region_tree");
    let body = serde_json::to_string_pretty(&v).unwrap() + "\n";
    let words: Vec<&str> = header.split(' ').collect();
    let sum = blake3::hash(body.as_bytes()).to_hex();
    fs::write(&rec, format!("{} {} {sum} -\n{body}", words[0], words[1])).unwrap();

    let o = pdguard(&["image", "inspect", s(&img)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("shred interrupted; run `pdguard image shred"),
        "{out}"
    );
    for args in [
        vec!["image", "unseal", s(&img), "--key-file", s(&key)],
        vec!["image", "seal", s(&img), "--key-file", s(&key)],
        vec!["image", "verify", s(&img)],
    ] {
        let o = pdguard(&args);
        assert_eq!(code(&o), 1, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("shred interrupted"), "{}", stderr(&o));
    }
    let o = pdguard(&["image", "shred", s(&img), "--yes", "--key-file", s(&key)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!dir.path().join("disk.img.pdguard.key").exists());
    assert!(!dir.path().join("disk.img.pdguard.tree").exists());
    let o = pdguard(&["image", "inspect", s(&img), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["phase"], "shredded");
}
