//! `pdguard image unseal PATH --force --output FILE`: recovery when a sealed image is
//! damaged. The best-effort plaintext goes to a new file; the sealed image and its record
//! stay as they are. Exit 0 when both digests match (the output is the data, verified),
//! 3 when one does not (the output is written, but some sectors are not the original).

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use pdguard_engine::jobs;
use pdguard_engine::store::file::FileDisk;
use serde_json::json;

use super::image::{key_for, storage, Target};
use super::progress::Bar;
use super::{Cli, CliError};

pub fn run(t: &Target, output: &Path, memory_bytes: u64, cli: &Cli) -> Result<(), CliError> {
    let st = storage(t)?;
    let rec = jobs::inspect(&st)?;
    let key = key_for(t, &rec)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(output)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => CliError::Input(format!(
                "--output {} already exists; pdguard never overwrites a file: pass a new path",
                output.display()
            )),
            _ => CliError::Io {
                what: format!("cannot create --output {}", output.display()),
                source: e,
            },
        })?;
    // From here on, a failure removes the file this command made: a refused rescue
    // leaves nothing behind.
    let result = write(
        &st,
        key.as_ref(),
        file,
        output,
        rec.image_bytes,
        memory_bytes,
        cli,
    );
    if result.is_err() {
        let _ = std::fs::remove_file(output);
    }
    let (r, secs) = result?;
    let ok = r.sealed_ok && r.plain_ok;
    if cli.json {
        let v = json!({
            "command": "unseal-force",
            "image": t.path.display().to_string(),
            "output": output.display().to_string(),
            "verified": ok,
            "sealed_digest": r.sealed_digest,
            "sealed_digest_matches": r.sealed_ok,
            "plain_digest": r.plain_digest,
            "plain_digest_matches": r.plain_ok,
            "seconds": secs,
        });
        out!("{v}");
    } else {
        out!(
            "wrote the plaintext of {} to {} ({} bytes, {secs:.2} s); the sealed image and its record are unchanged",
            t.path.display(),
            output.display(),
            rec.image_bytes
        );
    }
    if ok {
        return Ok(());
    }
    let which = match (r.sealed_ok, r.plain_ok) {
        (false, _) => format!(
            "the sealed image's digest is {} but its record says {}",
            r.sealed_digest,
            r.record.sealed_digest.as_deref().unwrap_or("nothing")
        ),
        _ => format!(
            "the plaintext's digest is {} but the record says {}",
            r.plain_digest,
            r.record.plain_digest.as_deref().unwrap_or("nothing")
        ),
    };
    Err(CliError::Unverified(format!(
        "{} did not verify: {which}; {} holds the best-effort plaintext (damaged sectors come out as noise): check it before you use it",
        t.path.display(),
        output.display()
    )))
}

fn write(
    st: &pdguard_engine::store::file::ImageStorage,
    key: Option<&pdguard_core::keys::MasterKey>,
    file: std::fs::File,
    output: &Path,
    bytes: u64,
    memory_bytes: u64,
    cli: &Cli,
) -> Result<(jobs::RescueReport, f64), CliError> {
    let io = |what: String| move |source| CliError::Io { what, source };
    file.set_len(bytes)
        .map_err(io(format!("cannot size --output {}", output.display())))?;
    let disk = FileDisk::new(file, format!("output {}", output.display()))
        .map_err(|e| CliError::Input(format!("cannot use --output {}: {e}", output.display())))?;
    let bar = Bar::new(cli.quiet);
    let t0 = Instant::now();
    let r = jobs::rescue(st, key, &disk, &bar, memory_bytes);
    bar.finish();
    Ok((r?, t0.elapsed().as_secs_f64()))
}
