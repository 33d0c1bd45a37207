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
//! After the handshake, the rest of the connection (the handshake's last options, then the
//! transmission threads) reads and writes through the session itself ([`Session`]).
//! OpenSSL works on memory ([`Records`]) under the session's lock; each thread makes its
//! own read(2) or write(2) of records outside it. So the transmission's reader, blocked
//! waiting for the next request, never holds up a worker's reply, as nbdkit's threads
//! share a GnuTLS session.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openssl::error::ErrorStack;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslStream, SslVerifyMode,
};
use openssl::x509::X509;
use pdguard_engine::store::safe_open::{self, How, SafeOpenError};
use thiserror::Error;
use zeroize::Zeroizing;

use super::connection::{Plain, Sock};
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

/// A server context: TLS 1.2 at least. Records go to memory, which always takes them, so a
/// write encrypts all it is given in one call; records are read ahead (one call takes
/// every record received, not one header and one body at a time).
fn server_builder() -> Result<SslContextBuilder, TlsError> {
    let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(ossl("OpenSSL"))?;
    b.set_min_proto_version(Some(openssl::ssl::SslVersion::TLS1_2))
        .map_err(ossl("OpenSSL"))?;
    b.set_read_ahead(true);
    Ok(b)
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
        let mut b = server_builder()?;
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
        let mut b = server_builder()?;
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
/// session on the same socket.
pub async fn upgrade(sock: Sock, tls: &Tls, timeout: Duration) -> Result<Sock, TlsError> {
    let ready = match sock {
        Sock::Unix(s) => Ready::Unix(s),
        Sock::Tcp(s) => Ready::Tcp(s),
        Sock::Tls(_) => {
            return Err(TlsError::Handshake(
                "NBD_OPT_STARTTLS on a connection that already carries TLS".into(),
            ))
        }
    };
    let ssl = Ssl::new(&tls.ctx).map_err(ossl("OpenSSL"))?;
    let stream = SslStream::new(ssl, Records::default()).map_err(ossl("OpenSSL"))?;
    let mut s = AsyncSession {
        session: Arc::new(Session {
            ssl: Mutex::new(stream),
        }),
        sock: ready,
        wire: Vec::new(),
    };
    match tokio::time::timeout(timeout, s.accept()).await {
        Err(_) => Err(TlsError::Timeout(timeout)),
        Ok(Err(e)) => Err(TlsError::Handshake(e)),
        Ok(Ok(())) => Ok(Sock::Tls(s)),
    }
}

/// OpenSSL's reason, once (its `Display` already includes the error stack).
fn describe(e: &openssl::ssl::Error) -> String {
    match e.io_error() {
        Some(io) => format!("the client left: {io}"),
        None => e.to_string(),
    }
}

fn io_error(e: openssl::ssl::Error) -> std::io::Error {
    match e.into_io_error() {
        Ok(io) => io,
        Err(e) => std::io::Error::other(describe(&e)),
    }
}

/// The end of the client's stream, said properly (`close_notify`) or not (the socket
/// closed): a read returns 0.
fn is_eof(e: &openssl::ssl::Error) -> bool {
    match e.code() {
        ErrorCode::ZERO_RETURN => true,
        ErrorCode::SYSCALL => e.io_error().is_none(),
        _ => false,
    }
}

/// Most ciphertext bytes read from the socket at once.
const WIRE_READ: usize = 64 << 10;
/// Plaintext encrypted at once before its records are written out (a streamed READ's
/// 4 MiB piece goes out in pieces of this size, so the ciphertext buffer stays small).
const SEAL_AT_ONCE: usize = 256 << 10;

/// The session's view of the wire: records received and not yet decrypted, records made and
/// not yet sent. OpenSSL reads and writes these, never the socket, so the session's lock is
/// held only while it computes; the socket's read(2) and write(2) are made outside it, by
/// the thread that needs them.
#[derive(Default)]
struct Records {
    inbound: Vec<u8>,
    at: usize,
    /// The client's end of stream came after `inbound`.
    eof: bool,
    outbound: Vec<u8>,
}

impl std::io::Read for Records {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let have = &self.inbound[self.at..];
        if have.is_empty() {
            return if self.eof {
                Ok(0)
            } else {
                Err(std::io::ErrorKind::WouldBlock.into())
            };
        }
        let n = have.len().min(buf.len());
        buf[..n].copy_from_slice(&have[..n]);
        self.at += n;
        if self.at == self.inbound.len() {
            self.inbound.clear();
            self.at = 0;
        }
        Ok(n)
    }
}

impl std::io::Write for Records {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.outbound.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a session call made of the bytes it had.
enum Step<T> {
    Done(T),
    /// More records from the client are needed.
    NeedMore,
}

/// A TLS session shared by a connection's threads. Its lock is held for one OpenSSL call
/// on memory ([`Records`]): the transmission's reader waits for the client's next request
/// in read(2) with no lock, while workers encrypt and send replies, as nbdkit's threads
/// share a GnuTLS session.
pub struct Session {
    ssl: Mutex<SslStream<Records>>,
}

impl Session {
    fn lock(&self) -> std::sync::MutexGuard<'_, SslStream<Records>> {
        self.ssl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records read from the socket (`None`: the client's end of stream).
    fn feed(&self, wire: Option<&[u8]>) {
        let mut s = self.lock();
        let r = s.get_mut();
        match wire {
            Some(b) => {
                if r.at > 0 {
                    r.inbound.drain(..r.at);
                    r.at = 0;
                }
                r.inbound.extend_from_slice(b);
            }
            None => r.eof = true,
        }
    }

    /// Run `f` once on the session, and append the records made so far to `out` (with
    /// `None`, they stay queued, in order, for the next call that takes them).
    fn call<T>(
        &self,
        out: Option<&mut Vec<u8>>,
        f: impl FnOnce(&mut SslStream<Records>) -> Result<T, openssl::ssl::Error>,
    ) -> Result<Step<T>, openssl::ssl::Error> {
        let mut s = self.lock();
        let r = f(&mut s);
        if let Some(out) = out {
            let made = &mut s.get_mut().outbound;
            if out.is_empty() {
                // The usual case: hand the records over without copying them (the empty
                // buffer, with its capacity, takes their place).
                std::mem::swap(out, made);
            } else {
                out.append(made);
            }
        }
        match r {
            Ok(v) => Ok(Step::Done(v)),
            Err(e) if e.code() == ErrorCode::WANT_READ => Ok(Step::NeedMore),
            Err(e) => Err(e),
        }
    }

    /// Decrypt into `buf`: `Done(0)` at the end of the client's stream. Records the session
    /// makes meanwhile (the answer to a TLS 1.3 key update) go to `out`, or with `None`
    /// wait for the next reply, which must follow them.
    fn decrypt(&self, buf: &mut [u8], out: Option<&mut Vec<u8>>) -> std::io::Result<Step<usize>> {
        match self.call(out, |s| s.ssl_read(buf)) {
            Ok(step) => Ok(step),
            Err(e) if is_eof(&e) => Ok(Step::Done(0)),
            Err(e) => Err(io_error(e)),
        }
    }

    /// Encrypt all of `data`, appending its records to `out`.
    fn encrypt(&self, mut data: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        while !data.is_empty() {
            match self
                .call(Some(&mut *out), |s| s.ssl_write(data))
                .map_err(io_error)?
            {
                Step::Done(n) => data = &data[n..],
                // Writing to memory never waits; a session that asks is broken.
                Step::NeedMore => {
                    return Err(std::io::Error::other("the TLS session cannot write"));
                }
            }
        }
        Ok(())
    }

    /// `close_notify`'s record, appended to `out` (best effort).
    fn close_notify(&self, out: &mut Vec<u8>) {
        let _ = self.call(Some(out), |s| s.shutdown());
    }
}

/// A connection in transmission through a TLS session: the blocking socket and buffers of
/// its own (the reader's and the writer's are clones, sharing the session).
pub struct TlsSock {
    session: Arc<Session>,
    sock: Plain,
    /// Records to send.
    wire: Vec<u8>,
    /// Records received, before the session takes them.
    received: Vec<u8>,
}

impl TlsSock {
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            session: Arc::clone(&self.session),
            sock: self.sock.try_clone()?,
            wire: Vec::new(),
            received: Vec::new(),
        })
    }

    fn send_wire(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        if !self.wire.is_empty() {
            self.sock.write_all(&self.wire)?;
            self.wire.clear();
        }
        Ok(())
    }

    /// `Read` ends the reading side at the socket (a waiting reader sees the end of the
    /// stream); `Write` and `Both` send `close_notify` first, best effort.
    pub fn shutdown(&self, how: std::net::Shutdown) {
        if how != std::net::Shutdown::Read {
            use std::io::Write;
            let mut out = Vec::new();
            self.session.close_notify(&mut out);
            let mut sock = &self.sock;
            let _ = sock.write_all(&out);
        }
        self.sock.shutdown(how);
    }
}

impl std::io::Read for TlsSock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.received.is_empty() {
            self.received.resize(WIRE_READ, 0);
        }
        loop {
            // The reader sends nothing: what the session answers while reading goes out
            // ahead of the next reply, whose records must follow it.
            match self.session.decrypt(buf, None)? {
                Step::Done(n) => return Ok(n),
                Step::NeedMore => {
                    let n = self.sock.read(&mut self.received)?;
                    self.session.feed((n > 0).then(|| &self.received[..n]));
                }
            }
        }
    }
}

impl std::io::Write for TlsSock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(SEAL_AT_ONCE);
        let mut wire = std::mem::take(&mut self.wire);
        let r = self.session.encrypt(&buf[..n], &mut wire);
        self.wire = wire;
        r?;
        self.send_wire()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The socket of a connection during the handshake, on the runtime.
enum Ready {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl Ready {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use tokio::io::AsyncReadExt;
        match self {
            Self::Unix(s) => s.read(buf).await,
            Self::Tcp(s) => s.read(buf).await,
        }
    }

    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match self {
            Self::Unix(s) => s.write_all(b).await,
            Self::Tcp(s) => s.write_all(b).await,
        }
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match self {
            Self::Unix(s) => s.shutdown().await,
            Self::Tcp(s) => s.shutdown().await,
        }
    }
}

/// A TLS session during the handshake's last options, on the runtime.
pub struct AsyncSession {
    session: Arc<Session>,
    sock: Ready,
    wire: Vec<u8>,
}

impl AsyncSession {
    async fn send_wire(&mut self) -> std::io::Result<()> {
        if !self.wire.is_empty() {
            let wire = std::mem::take(&mut self.wire);
            self.sock.write_all(&wire).await?;
            self.wire = wire;
            self.wire.clear();
        }
        Ok(())
    }

    /// Read records from the socket into the session; false at the end of stream.
    async fn receive(&mut self) -> std::io::Result<bool> {
        let mut wire = vec![0u8; WIRE_READ];
        let n = self.sock.read(&mut wire).await?;
        self.session.feed((n > 0).then(|| &wire[..n]));
        Ok(n > 0)
    }

    /// The server's side of the TLS handshake.
    async fn accept(&mut self) -> Result<(), String> {
        let gone = |e: std::io::Error| format!("the client left: {e}");
        loop {
            let step = self.session.call(Some(&mut self.wire), |s| s.accept());
            // The handshake's records go out even when it failed (an alert says why).
            self.send_wire().await.map_err(gone)?;
            match step.map_err(|e| describe(&e))? {
                Step::Done(()) => return Ok(()),
                Step::NeedMore => {
                    if !self.receive().await.map_err(gone)? {
                        return Err("the client left during the TLS handshake".into());
                    }
                }
            }
        }
    }

    pub async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let step = self.session.decrypt(buf, Some(&mut self.wire))?;
            self.send_wire().await?;
            match step {
                Step::Done(n) => return Ok(n),
                Step::NeedMore => {
                    self.receive().await?;
                }
            }
        }
    }

    pub async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.session.encrypt(b, &mut self.wire)?;
        self.send_wire().await
    }

    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.session.close_notify(&mut self.wire);
        let _ = self.send_wire().await;
        self.sock.shutdown().await
    }

    /// The session for transmission's threads, on the same socket made blocking. Records
    /// already received and not yet decrypted stay in the session.
    pub fn into_std(self) -> std::io::Result<TlsSock> {
        let sock = match self.sock {
            Ready::Unix(s) => Plain::Unix(s.into_std()?),
            Ready::Tcp(s) => Plain::Tcp(s.into_std()?),
        };
        sock.set_nonblocking(false)?;
        Ok(TlsSock {
            session: self.session,
            sock,
            wire: self.wire,
            received: Vec::new(),
        })
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
