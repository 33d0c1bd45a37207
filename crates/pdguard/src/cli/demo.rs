//! `pdguard demo`: a sample image with text in it, sealed, read linearly, unsealed, checked.

use std::fs;
use std::path::{Path, PathBuf};

use pdguard_core::Profile;
use pdguard_engine::jobs::{self, NoProgress, SealOptions};
use pdguard_engine::keyfile;
use pdguard_engine::store::file::{default_record_path, ImageStorage};

use super::{Cli, CliError};

const SECTOR: usize = 512;

/// Sector `i` of the sample: readable lines that name their own sector.
fn sample_sector(i: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut line = 0;
    while s.len() < SECTOR {
        s.push_str(&format!(
            "sector {i:06} line {line}: customer-{:04}@example.com owes {}.{:02} EUR; note: keep private\n",
            (i * 7 + line) % 9973,
            (i * 31 + line * 17) % 5000,
            (i + line) % 100
        ));
        line += 1;
    }
    s.truncate(SECTOR);
    s.into_bytes()
}

/// The first `n` "sector NNNNNN" labels found by reading the image linearly.
fn linear_labels(img: &[u8], n: usize) -> Vec<String> {
    img.chunks_exact(SECTOR)
        .take(n)
        .map(|s| String::from_utf8_lossy(&s[..13]).into_owned())
        .collect()
}

/// The first 8 bytes of the first `n` sectors, in hex (the secure profile's ciphertext).
fn linear_hex(img: &[u8], n: usize) -> Vec<String> {
    img.chunks_exact(SECTOR)
        .take(n)
        .map(|s| hex::encode(&s[..8]))
        .collect()
}

/// How often the sample's text `sector ` occurs in `img`, at any offset.
fn count_text(img: &[u8]) -> usize {
    img.windows(7).filter(|w| *w == b"sector ").count()
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> CliError {
    move |source| CliError::Io { what, source }
}

/// `bytes`: a size from 8K to 1G in whole sectors (checked by the parser, `size::demo`).
pub fn run(dir: Option<PathBuf>, bytes: u64, cli: &Cli) -> Result<(), CliError> {
    let tmp;
    let dir = match dir {
        Some(d) => {
            fs::create_dir_all(&d).map_err(io(format!("cannot create {}", d.display())))?;
            d
        }
        None => {
            tmp = tempfile::tempdir().map_err(io("cannot create a temporary directory".into()))?;
            tmp.path().to_path_buf()
        }
    };
    walk(&dir.join("demo.img"), bytes, cli)
}

fn walk(path: &Path, bytes: u64, cli: &Cli) -> Result<(), CliError> {
    let say = |s: String| {
        if !cli.json {
            out!("{s}");
        }
    };
    let sectors = bytes as usize / SECTOR;
    let original: Vec<u8> = (0..sectors).flat_map(sample_sector).collect();
    fs::write(path, &original).map_err(io(format!("cannot write {}", path.display())))?;
    let _ = fs::remove_file(default_record_path(path));
    let digest = blake3::hash(&original).to_hex().to_string();
    say(format!(
        "1. wrote {} ({sectors} sectors of text), BLAKE3 {digest}",
        path.display()
    ));
    say(format!(
        "   a linear read finds: {:?}",
        linear_labels(&original, 4)
    ));

    let st = ImageStorage::new(path.to_path_buf(), default_record_path(path), None);
    let opts = SealOptions {
        profile: Profile::Patent,
        ..SealOptions::default()
    };
    jobs::seal(&st, &opts, &NoProgress)?;
    let sealed = fs::read(path).map_err(io(format!("cannot read {}", path.display())))?;
    let moved = sealed
        .chunks_exact(SECTOR)
        .zip(original.chunks_exact(SECTOR))
        .filter(|(a, b)| a != b)
        .count();
    say(format!(
        "2. sealed it (patent profile): {moved} of {sectors} sectors are away from their place ({:.2}%)",
        moved as f64 * 100.0 / sectors as f64
    ));
    say(format!(
        "   a linear read now finds: {:?}",
        linear_labels(&sealed, 4)
    ));
    say("   (the patent profile hides the order of sectors, not their contents)".into());

    let v = jobs::verify(&st, None, &NoProgress)?;
    say(format!(
        "3. verified the sealed image without unsealing it: BLAKE3 {}",
        v.digest
    ));

    jobs::unseal(&st, None, &NoProgress)?;
    let back = fs::read(path).map_err(io(format!("cannot read {}", path.display())))?;
    let back_digest = blake3::hash(&back).to_hex().to_string();
    if back != original {
        return Err(CliError::Demo(format!(
            "unsealed image differs from the original (BLAKE3 {back_digest})"
        )));
    }
    say(format!(
        "4. unsealed it: BLAKE3 {back_digest}, bit-exact with the original"
    ));

    // The secure profile, with a master key made for the demo beside the image.
    let key_path = path.with_file_name("demo-master.key");
    let _ = fs::remove_file(&key_path);
    let master = keyfile::generate(&key_path)?;
    let secure = SealOptions {
        profile: Profile::Secure,
        master_key: Some(master.clone()),
        ..SealOptions::default()
    };
    jobs::seal(&st, &secure, &NoProgress)?;
    let sealed_secure = fs::read(path).map_err(io(format!("cannot read {}", path.display())))?;
    let readable = count_text(&sealed_secure);
    let in_original = count_text(&original);
    let secure_digest = jobs::verify(&st, None, &NoProgress)?.digest;
    say(format!(
        "5. sealed it with the secure profile (default; key {}): a linear read finds the text \"sector \" {readable} times; in the original it occurs {in_original} times (every line of the sample starts with it)",
        key_path.display(),
    ));
    say(format!(
        "   a linear read now finds bytes like these, where the labels were: {:?}",
        linear_hex(&sealed_secure, 4)
    ));
    jobs::unseal(&st, Some(&master), &NoProgress)?;
    let back = fs::read(path).map_err(io(format!("cannot read {}", path.display())))?;
    if back != original || readable != 0 {
        return Err(CliError::Demo("secure round trip failed".into()));
    }
    say("6. unsealed it with the key: bit-exact with the original".into());
    if cli.json {
        let v = serde_json::json!({
            "image": path.display().to_string(),
            "sectors": sectors,
            "plain_digest": digest,
            "patent": {
                "moved": moved,
                "linear_read": linear_labels(&sealed, 4),
                "sealed_digest": v.digest,
                "bit_exact": true,
            },
            "secure": {
                "key_file": key_path.display().to_string(),
                "text_occurrences": readable,
                "text_occurrences_in_original": in_original,
                "sealed_digest": secure_digest,
                "bit_exact": true,
            },
            "bit_exact": true,
        });
        out!("{v}");
    }
    Ok(())
}
