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
    #[error("{0} is a symbolic link or not a regular file; name the file itself")]
    NotAFile(PathBuf),
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

/// Read a secret (a PSK file, a private key): a regular file, not through a symbolic link
/// (`O_NOFOLLOW`), that not every user can read.
fn read_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, TlsError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read_err = |source| TlsError::Read {
        path: path.into(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(c) if c == rustix::io::Errno::LOOP.raw_os_error() => {
                TlsError::NotAFile(path.into())
            }
            _ => read_err(e),
        })?;
    let meta = f.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(TlsError::NotAFile(path.into()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(TlsError::Readable {
            path: path.into(),
            mode,
        });
    }
    let mut bytes = Zeroizing::new(Vec::new());
    f.read_to_end(&mut bytes).map_err(read_err)?;
    Ok(bytes)
}

fn exists(path: &Path) -> Result<(), TlsError> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })
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
        for p in [&ca, &cert] {
            exists(p)?;
        }
        let pem = read_secret(&key)?;
        let pkey = openssl::pkey::PKey::private_key_from_pem(&pem)
            .map_err(ossl(format!("{} is not a PEM private key", key.display())))?;
        let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(ossl("OpenSSL"))?;
        b.set_min_proto_version(Some(openssl::ssl::SslVersion::TLS1_2))
            .map_err(ossl("OpenSSL"))?;
        b.set_certificate_chain_file(&cert)
            .map_err(ossl(format!("cannot load {}", cert.display())))?;
        b.set_private_key(&pkey)
            .map_err(ossl(format!("cannot load {}", key.display())))?;
        b.check_private_key().map_err(ossl(format!(
            "{} is not the key of {}",
            key.display(),
            cert.display()
        )))?;
        b.set_ca_file(&ca)
            .map_err(ossl(format!("cannot load {}", ca.display())))?;
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
    let bytes = read_secret(path)?;
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
async fn pump<S>(ssl: tokio_openssl::SslStream<S>, inner: tokio::net::UnixStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
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
    tokio::pin!(up, down);
    tokio::select! {
        _ = &mut up => { let _ = tokio::time::timeout(LINGER, down).await; }
        _ = &mut down => {}
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
}
