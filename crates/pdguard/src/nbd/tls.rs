//! TLS of the NBD export, as qemu-nbd and nbdkit do it (proto.md "TLS support"): the
//! client asks with `NBD_OPT_STARTTLS`, the server acks, and the TLS handshake runs on
//! the same socket; the rest of the handshake and transmission go through the session.
//!
//! Credentials, in the layouts qemu and nbdkit use:
//! - X.509 (`--nbd-tls-certs DIR`): `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
//!   qemu's `tls-creds-x509` directory. The client must present a certificate the CA
//!   signed (qemu's `verify-peer=on`): a certificate alone proves nothing about who asks.
//! - PSK (`--nbd-tls-psk FILE`): lines `username:hexkey`, GnuTLS `psktool`'s format, read
//!   by qemu's `tls-creds-psk` and nbdkit's `--tls-psk`.
//!
//! The stack is OpenSSL (the `openssl` crate): it speaks external PSK in TLS 1.2 and 1.3
//! with GnuTLS peers, which rustls does not.
//!
//! After the handshake, the session is pumped to the clear-text end of a socket pair: the
//! rest of the connection (handshake and transmission threads) works on that end as on any
//! unix socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openssl::error::ErrorStack;
use openssl::ssl::{Ssl, SslContext, SslContextBuilder, SslMethod, SslVerifyMode};
use openssl::x509::X509;
use pdguard_engine::store::safe_open::{self, How, SafeOpenError};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use zeroize::Zeroizing;

use super::connection::Sock;

/// How long the pump keeps a client's half open after the server's side ended.
const LINGER: Duration = Duration::from_secs(5);
/// Buffer of each direction of the pump.
const PUMP_BUF: usize = 256 << 10;
/// OpenSSL's limit on a PSK (`PSK_MAX_PSK_LEN`).
const MAX_PSK: usize = 512;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} can be read by every user (mode {mode:o}); run `chmod o-rwx {path}`")]
    Readable { path: PathBuf, mode: u32 },
    /// A symbolic link, a FIFO, a device: refused before a byte is read.
    #[error(transparent)]
    NotAFile(Box<SafeOpenError>),
    #[error("{path} line {line}: {why}; each line is username:hexkey (psktool's format)")]
    PskLine {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("{0} holds no username:hexkey line; make one with `psktool -u NAME -p {0}`")]
    PskEmpty(PathBuf),
    #[error("{what}")]
    Openssl {
        what: String,
        #[source]
        source: ErrorStack,
    },
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Handshake(String),
    #[error("cannot make the socket pair of the TLS session")]
    Pair(#[source] std::io::Error),
}

/// `--nbd-tls`: whether a client may skip TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Every option but `STARTTLS` and `ABORT` before TLS is `NBD_REP_ERR_TLS_REQD`.
    Require,
    /// TLS is offered; a client may go on in clear text.
    On,
}

/// The server side of TLS, shared by every connection.
pub struct Tls {
    ctx: SslContext,
    pub mode: TlsMode,
    /// "X.509" or "PSK", for logs.
    pub kind: &'static str,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tls({}, {:?})", self.kind, self.mode)
    }
}

fn ossl(what: impl Into<String>) -> impl FnOnce(ErrorStack) -> TlsError {
    let what = what.into();
    move |source| TlsError::Openssl { what, source }
}

/// Most bytes read from a credentials file (a PEM chain, a PSK file).
const MAX_CREDENTIALS: u64 = 1 << 20;

/// Open a credentials file as every file pdguard reads ([`safe_open`]): not through a
/// symbolic link, and only a regular file, refused before a byte is read (a FIFO there
/// would block the start for ever).
fn open_credentials(path: &Path, what: &str) -> Result<std::fs::File, TlsError> {
    match safe_open::open(path, what, How::READ) {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(TlsError::Read {
            path: path.into(),
            source: std::io::ErrorKind::NotFound.into(),
        }),
        Err(e) => Err(TlsError::NotAFile(Box::new(e))),
    }
}

/// Read a secret (a PSK file, a private key): as [`open_credentials`], and not readable by
/// every user.
fn read_secret(path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>, TlsError> {
    use std::io::Read;
    let read_err = |source| TlsError::Read {
        path: path.into(),
        source,
    };
    let f = open_credentials(path, what)?;
    let meta = f.metadata().map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(TlsError::Readable {
            path: path.into(),
            mode,
        });
    }
    let mut bytes = Zeroizing::new(Vec::new());
    f.take(MAX_CREDENTIALS)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    Ok(bytes)
}

/// The bytes of a certificate file (not secret, but read the same careful way).
fn read_public(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let mut pem = Vec::new();
    open_credentials(path, what)?
        .take(MAX_CREDENTIALS)
        .read_to_end(&mut pem)
        .map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })?;
    Ok(pem)
}

/// The certificates of a PEM file's bytes.
fn certs(path: &Path, pem: &[u8]) -> Result<Vec<X509>, TlsError> {
    let certs = X509::stack_from_pem(pem)
        .map_err(ossl(format!("{} is not PEM certificates", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Openssl {
            what: format!("{} holds no certificate", path.display()),
            source: ErrorStack::get(),
        });
    }
    Ok(certs)
}

impl Tls {
    /// X.509 from qemu's directory layout; client certificates are required and checked
    /// against `ca-cert.pem`.
    pub fn x509(dir: &Path, mode: TlsMode) -> Result<Self, TlsError> {
        let (ca, cert, key) = (
            dir.join("ca-cert.pem"),
            dir.join("server-cert.pem"),
            dir.join("server-key.pem"),
        );
        // Every file is opened and read before any is parsed: whichever is a FIFO (or a
        // link) is refused, whatever the others hold.
        let ca_pem = read_public(&ca, "TLS CA certificate")?;
        let cert_pem = read_public(&cert, "TLS server certificate")?;
        let pem = read_secret(&key, "TLS server key")?;
        let cas = certs(&ca, &ca_pem)?;
        let chain = certs(&cert, &cert_pem)?;
        let pkey = openssl::pkey::PKey::private_key_from_pem(&pem)
            .map_err(ossl(format!("{} is not a PEM private key", key.display())))?;
        let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(ossl("OpenSSL"))?;
        b.set_min_proto_version(Some(openssl::ssl::SslVersion::TLS1_2))
            .map_err(ossl("OpenSSL"))?;
        let load = |e| ossl(format!("cannot load {}", cert.display()))(e);
        let mut chain = chain.into_iter();
        if let Some(leaf) = chain.next() {
            b.set_certificate(&leaf).map_err(load)?;
        }
        for c in chain {
            b.add_extra_chain_cert(c).map_err(load)?;
        }
        b.set_private_key(&pkey)
            .map_err(ossl(format!("cannot load {}", key.display())))?;
        b.check_private_key().map_err(ossl(format!(
            "{} is not the key of {}",
            key.display(),
            cert.display()
        )))?;
        for c in cas {
            b.cert_store_mut()
                .add_cert(c)
                .map_err(ossl(format!("cannot load {}", ca.display())))?;
        }
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        Ok(Self {
            ctx: b.build(),
            mode,
            kind: "X.509",
        })
    }

    /// PSK from a `username:hexkey` file.
    pub fn psk(file: &Path, mode: TlsMode) -> Result<Self, TlsError> {
        let keys = Arc::new(read_psk_file(file)?);
        let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(ossl("OpenSSL"))?;
        b.set_min_proto_version(Some(openssl::ssl::SslVersion::TLS1_2))
            .map_err(ossl("OpenSSL"))?;
        // TLS 1.2 suites with a PSK key exchange (TLS 1.3 takes its defaults).
        b.set_cipher_list("ECDHEPSK:PSK:!eNULL:!aNULL:!SHA1:!3DES")
            .map_err(ossl("OpenSSL has no PSK cipher suite"))?;
        b.set_psk_server_callback(move |_ssl, identity, out| {
            let Some(id) = identity else { return Ok(0) };
            match keys.iter().find(|(u, _)| u.as_bytes() == id) {
                Some((_, k)) if k.len() <= out.len() => {
                    out[..k.len()].copy_from_slice(k);
                    Ok(k.len())
                }
                // Unknown user: the handshake fails.
                _ => Ok(0),
            }
        });
        Ok(Self {
            ctx: b.build(),
            mode,
            kind: "PSK",
        })
    }

    pub fn required(&self) -> bool {
        self.mode == TlsMode::Require
    }
}

type PskKeys = Vec<(String, Zeroizing<Vec<u8>>)>;

fn read_psk_file(path: &Path) -> Result<PskKeys, TlsError> {
    let bytes = read_secret(path, "TLS PSK file")?;
    let text = std::str::from_utf8(&bytes).map_err(|_| TlsError::PskLine {
        path: path.into(),
        line: 1,
        why: "the file is not UTF-8 text".into(),
    })?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| TlsError::PskLine {
            path: path.into(),
            line: i + 1,
            why: why.into(),
        };
        let (user, hex_key) = line.rsplit_once(':').ok_or_else(|| bad("no ':'"))?;
        if user.is_empty() {
            return Err(bad("the username is empty"));
        }
        let key = Zeroizing::new(
            hex::decode(hex_key.trim()).map_err(|_| bad("the key is not hexadecimal"))?,
        );
        if key.is_empty() || key.len() > MAX_PSK {
            return Err(bad(&format!("the key must be 1 to {MAX_PSK} bytes")));
        }
        keys.push((user.to_string(), key));
    }
    if keys.is_empty() {
        return Err(TlsError::PskEmpty(path.into()));
    }
    Ok(keys)
}

/// The TLS handshake on `sock` (after the `NBD_OPT_STARTTLS` ack), within `timeout`; the
/// clear-text end of the session.
pub async fn upgrade(sock: Sock, tls: &Tls, timeout: Duration) -> Result<Sock, TlsError> {
    match sock {
        Sock::Unix(s) => upgrade_stream(s, tls, timeout).await,
        Sock::Tcp(s) => upgrade_stream(s, tls, timeout).await,
    }
}

async fn upgrade_stream<S>(s: S, tls: &Tls, timeout: Duration) -> Result<Sock, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ssl = Ssl::new(&tls.ctx).map_err(ossl("OpenSSL"))?;
    let mut stream = tokio_openssl::SslStream::new(ssl, s).map_err(ossl("OpenSSL"))?;
    match tokio::time::timeout(timeout, Pin::new(&mut stream).accept()).await {
        Err(_) => return Err(TlsError::Timeout(timeout)),
        Ok(Err(e)) => return Err(TlsError::Handshake(describe(&e))),
        Ok(Ok(())) => {}
    }
    let (plain, inner) = tokio::net::UnixStream::pair().map_err(TlsError::Pair)?;
    tokio::spawn(pump(stream, inner));
    Ok(Sock::Unix(plain))
}

/// OpenSSL's reason, once (its `Display` already includes the error stack).
fn describe(e: &openssl::ssl::Error) -> String {
    match e.io_error() {
        Some(io) => format!("the client left: {io}"),
        None => e.to_string(),
    }
}

/// Copy between the TLS session and the clear-text end until the server's side ends (then
/// close_notify), or until the client's side ends and the server has answered (LINGER).
/// The two directions are tasks of their own, so that decrypting requests and encrypting
/// replies run on both of the runtime's threads (the session itself is locked per call).
async fn pump<S>(ssl: tokio_openssl::SslStream<S>, inner: tokio::net::UnixStream)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sr, mut sw) = tokio::io::split(ssl);
    let (ir, mut iw) = inner.into_split();
    let up = async move {
        let _ = tokio::io::copy_buf(&mut BufReader::with_capacity(PUMP_BUF, sr), &mut iw).await;
        let _ = iw.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy_buf(&mut BufReader::with_capacity(PUMP_BUF, ir), &mut sw).await;
        let _ = sw.shutdown().await;
    };
    let mut up = tokio::spawn(up);
    let mut down = tokio::spawn(down);
    tokio::select! {
        _ = &mut up => {
            if tokio::time::timeout(LINGER, &mut down).await.is_err() {
                down.abort();
            }
        }
        _ = &mut down => up.abort(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_are_parsed_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.psk");
        let write = |s: &str| {
            std::fs::write(&p, s).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        write("alice:0123abcd\n\nbob:ff\n");
        let k = read_psk_file(&p).unwrap();
        assert_eq!(k[0].0, "alice");
        assert_eq!(&k[0].1[..], &[0x01, 0x23, 0xab, 0xcd]);
        assert_eq!(k[1].0, "bob");
        for bad in ["alice", ":00", "alice:xyz", "alice:", "\n\n"] {
            write(bad);
            assert!(read_psk_file(&p).is_err(), "{bad:?}");
        }
        write("alice:00");
        assert!(Tls::psk(&p, TlsMode::Require).is_ok());
        // Not through a symbolic link.
        let link = dir.path().join("link.psk");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let e = Tls::psk(&link, TlsMode::Require).unwrap_err();
        assert!(matches!(e, TlsError::NotAFile(_)), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Tls::psk(&p, TlsMode::Require).unwrap_err().to_string();
        assert!(e.contains("chmod o-rwx"), "{e}");
    }

    fn mkfifo(p: &Path) {
        use rustix::fs::{mknodat, FileType, Mode, CWD};
        mknodat(CWD, p, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
    }

    /// A FIFO at any credentials file (nobody writes to it) is refused at once, naming
    /// it, instead of blocking the daemon's start for ever.
    #[test]
    fn a_fifo_at_any_credentials_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let psk = dir.path().join("keys.psk");
        mkfifo(&psk);
        let t = std::time::Instant::now();
        let e = Tls::psk(&psk, TlsMode::Require).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(1));
        let text = e.to_string();
        assert!(
            text.contains("FIFO") && text.contains(&psk.display().to_string()),
            "{text}"
        );
        // X.509: each of the three files in turn is the FIFO, the others real.
        let (cert_pem, key_pem) = self_signed();
        for fifo in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            let certs = dir.path().join(fifo.replace('.', "-"));
            std::fs::create_dir(&certs).unwrap();
            for (f, pem) in [
                ("ca-cert.pem", &cert_pem),
                ("server-cert.pem", &cert_pem),
                ("server-key.pem", &key_pem),
            ] {
                let p = certs.join(f);
                if f == fifo {
                    mkfifo(&p);
                } else {
                    std::fs::write(&p, pem).unwrap();
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
                }
            }
            let t = std::time::Instant::now();
            let e = Tls::x509(&certs, TlsMode::Require).unwrap_err();
            assert!(t.elapsed() < Duration::from_secs(1), "{fifo}");
            let text = e.to_string();
            let path = certs.join(fifo).display().to_string();
            assert!(text.contains("FIFO") && text.contains(&path), "{text}");
            // The same files with the FIFO replaced by the real one load.
            std::fs::remove_file(&path).unwrap();
            let pem = if fifo == "server-key.pem" {
                &key_pem
            } else {
                &cert_pem
            };
            std::fs::write(&path, pem).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            Tls::x509(&certs, TlsMode::Require).unwrap();
        }
    }

    /// A self-signed certificate and its key, PEM.
    fn self_signed() -> (Vec<u8>, Vec<u8>) {
        use openssl::{asn1, bn, ec, hash, nid, pkey, x509};
        let group = ec::EcGroup::from_curve_name(nid::Nid::X9_62_PRIME256V1).unwrap();
        let key = pkey::PKey::from_ec_key(ec::EcKey::generate(&group).unwrap()).unwrap();
        let mut name = x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "pdguard-test").unwrap();
        let name = name.build();
        let mut b = x509::X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        let serial = bn::BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap();
        b.set_serial_number(&serial).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        b.sign(&key, hash::MessageDigest::sha256()).unwrap();
        let cert = b.build().to_pem().unwrap();
        (cert, key.private_key_to_pem_pkcs8().unwrap())
    }
}
