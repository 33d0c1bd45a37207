//! Master key files: made by `pdguard keygen`, mode 0600, refused when group or others can
//! read them. Lookup order: `--key-file`, then `$PDGUARD_KEY_FILE`, then [`DEFAULT_KEY_FILE`].

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pdguard_core::keys::{KeyError, MasterKey};

use crate::store::safe_open::{self, How};
use thiserror::Error;

/// Where the master key is looked for when neither `--key-file` nor the environment names one.
pub const DEFAULT_KEY_FILE: &str = "/etc/pdguard/master.key";
/// The environment variable that names the key file.
pub const KEY_FILE_ENV: &str = "PDGUARD_KEY_FILE";

#[derive(Debug, Error)]
pub enum KeyFileError {
    #[error("no master key file at {path}; make one with `pdguard keygen {path}` or pass --key-file FILE (or set PDGUARD_KEY_FILE)")]
    Missing { path: String },
    #[error(
        "key file {path} can be read by group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    Exposed { path: String, mode: u32 },
    #[error("key file {path} belongs to uid {owner}, neither to the user running pdguard (uid {me}) nor to root; if it is yours, run `chown {me} {path}`")]
    Foreign { path: String, owner: u32, me: u32 },
    /// A symbolic link, a FIFO, a device: refused before a byte is read.
    #[error(transparent)]
    Unsafe(safe_open::SafeOpenError),
    #[error("key file {path} cannot be used")]
    Parse {
        path: String,
        #[source]
        source: KeyError,
    },
    #[error("refusing to overwrite existing key file {path}; move it away first or pick another path (overwriting a master key destroys every seal made with it)")]
    Exists { path: String },
    #[error("cannot {op} key file {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The key file to use: `explicit`, else `$PDGUARD_KEY_FILE`, else the default path.
pub fn locate(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os(KEY_FILE_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_KEY_FILE),
    }
}

/// Read a master key file, refusing one that group or others can read, or that is owned
/// by another user than the one running pdguard (or root): whoever owns it can swap it.
pub fn load(path: &Path) -> Result<MasterKey, KeyFileError> {
    let shown = path.display().to_string();
    // One open, then fstat: the checks and the read are of the same file, never through a
    // symbolic link, and a FIFO or device is refused instead of waited on (safe_open).
    let mut file = match safe_open::open(path, "key file", How::READ) {
        Ok(Some(f)) => f,
        Ok(None) => return Err(KeyFileError::Missing { path: shown }),
        Err(e) => return Err(KeyFileError::Unsafe(e)),
    };
    let meta = file.metadata().map_err(|e| KeyFileError::Io {
        op: "read",
        path: shown.clone(),
        source: e,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Exposed { path: shown, mode });
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(KeyFileError::Foreign {
            path: shown,
            owner: meta.uid(),
            me,
        });
    }
    let mut text = zeroize::Zeroizing::new(Vec::new());
    // A key file is one short line: never read more than a page of it.
    (&mut file)
        .take(4097)
        .read_to_end(&mut text)
        .map_err(|e| KeyFileError::Io {
            op: "read",
            path: shown.clone(),
            source: e,
        })?;
    if text.len() > 4096 {
        return Err(KeyFileError::Parse {
            path: shown,
            source: KeyError::NotAKeyFile,
        });
    }
    MasterKey::from_file(&text).map_err(|source| KeyFileError::Parse {
        path: shown,
        source,
    })
}

/// Keep this process's memory (master key, data keys, seeds, plaintext) out of core dumps
/// and away from `ptrace` by users other than root: `prctl(PR_SET_DUMPABLE, 0)`. Also makes
/// `/proc/PID/*` owned by root. Called first by `serve` and by the commands that touch keys.
pub fn keep_out_of_core_dumps() -> Result<(), KeyFileError> {
    use rustix::process::{set_dumpable_behavior, DumpableBehavior};
    set_dumpable_behavior(DumpableBehavior::NotDumpable).map_err(|e| KeyFileError::Io {
        op: "protect (prctl PR_SET_DUMPABLE)",
        path: "of this process".into(),
        source: e.into(),
    })
}

/// Write a new random master key to `path` with mode 0600; never overwrites.
pub fn generate(path: &Path) -> Result<MasterKey, KeyFileError> {
    let shown = path.display().to_string();
    let key = MasterKey::from_bytes(rand::random());
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => KeyFileError::Exists {
                path: shown.clone(),
            },
            _ => KeyFileError::Io {
                op: "create",
                path: shown.clone(),
                source: e,
            },
        })?;
    let io_err = |source| KeyFileError::Io {
        op: "write",
        path: shown.clone(),
        source,
    };
    // The umask cannot widen 0600, but an inherited ACL default could: set it explicitly.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_err)?;
    f.write_all(key.to_file().as_bytes()).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::store::file::sync_dir(dir).map_err(io_err)?;
    }
    Ok(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn not_dumpable_after_protection() {
        use rustix::process::{dumpable_behavior, DumpableBehavior};
        keep_out_of_core_dumps().unwrap();
        assert_eq!(dumpable_behavior().unwrap(), DumpableBehavior::NotDumpable);
    }

    #[test]
    fn generate_load_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        let k = generate(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load(&p).unwrap().id(), k.id());
        let before = fs::read(&p).unwrap();
        assert!(matches!(generate(&p), Err(KeyFileError::Exists { .. })));
        assert_eq!(fs::read(&p).unwrap(), before, "keygen overwrote a key");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load(&p),
            Err(KeyFileError::Exposed { mode: 0o644, .. })
        ));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(load(&p), Err(KeyFileError::Exposed { .. })));
        assert!(matches!(
            load(&dir.path().join("none")),
            Err(KeyFileError::Missing { .. })
        ));
        // Owned by another user (chown needs root; the suite runs as root): refused; owned
        // by root: accepted, whoever runs pdguard.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
            assert!(matches!(
                load(&p),
                Err(KeyFileError::Foreign { owner: 65534, .. })
            ));
            std::os::unix::fs::chown(&p, Some(0), None).unwrap();
        }
        assert_eq!(load(&p).unwrap().id(), k.id());
        let junk = dir.path().join("junk");
        fs::write(&junk, "hello").unwrap();
        fs::set_permissions(&junk, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(load(&junk), Err(KeyFileError::Parse { .. })));
    }

    #[test]
    fn a_fifo_or_a_link_is_refused_at_once_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("master.key");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let t = std::time::Instant::now();
        let e = load(&fifo).unwrap_err();
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        let text = e.to_string();
        assert!(text.contains("key file") && text.contains("FIFO"), "{text}");
        assert!(text.contains(&fifo.display().to_string()), "{text}");
        let real = dir.path().join("real.key");
        generate(&real).unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = load(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }
}
