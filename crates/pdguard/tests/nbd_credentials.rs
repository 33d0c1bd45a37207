//! The NBD TLS credentials are files pdguard reads at start, like the seal record and the
//! API token file: a FIFO planted at the PSK file or at any file of the X.509 directory
//! is refused within a second (exit 2: the command line names unusable credentials), on
//! one line naming the file, and nothing is started, instead of hanging the daemon before
//! it binds anything.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;

/// After this the command is killed and the test fails as hung.
const HUNG_AFTER: Duration = Duration::from_secs(10);

fn mkfifo(p: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

/// `pdguard serve ARGS`, killed (and the test failed) if it runs past [`HUNG_AFTER`].
fn serve_bounded(args: &[&str]) -> (Output, Duration) {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    pdguard_within(HUNG_AFTER, &all)
}

fn refused_at_start(dir: &Path, tls: &[&str], fifo: &Path) {
    let state = dir.join("state");
    let sock = format!("unix:{}", dir.join("nbd.sock").display());
    let mut args = vec!["--state-dir", s(&state), "--nbd", &sock];
    args.extend_from_slice(tls);
    let (o, took) = serve_bounded(&args);
    let err = stderr(&o);
    assert_eq!(code(&o), 2, "{tls:?}: {err}");
    assert!(
        took < Duration::from_secs(1),
        "{tls:?} took {took:?}: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{tls:?}: {err}");
    assert!(
        err.contains(s(fifo)) && err.contains("FIFO"),
        "{tls:?}: {err}"
    );
    assert!(!state.exists(), "a refused start made {}", state.display());
}

#[test]
fn a_fifo_at_the_psk_file_or_a_certificate_file_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let psk = dir.path().join("keys.psk");
    mkfifo(&psk);
    refused_at_start(dir.path(), &["--nbd-tls-psk", s(&psk)], &psk);
    // X.509: each file of the directory in turn; the others hold anything (every file
    // is opened before any is parsed).
    for fifo in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        let certs = dir.path().join(fifo.replace('.', "-"));
        std::fs::create_dir(&certs).unwrap();
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            let p = certs.join(f);
            if f == fifo {
                mkfifo(&p);
            } else {
                std::fs::write(&p, "x").unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
        refused_at_start(
            dir.path(),
            &["--nbd-tls-certs", s(&certs)],
            &certs.join(fifo),
        );
    }
}
