//! The bytes of one connection: its socket (async during the handshake, blocking in
//! transmission) and its inbox of bytes received and not yet parsed, read one frame at a
//! time. Payloads never pass through the inbox: they are read straight into the buffer
//! of their request (or streamed, or discarded), so the inbox keeps its size.

use std::io::{self, Read, Write};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::tls::{self, TlsError};
use super::wire::{self, Frame};

/// Size of the receive buffer: request headers and handshake options (at most
/// `handshake::MAX_OPTION` plus a header) fit in it.
pub const RECV_BUF: usize = 128 << 10;

#[derive(Debug, Error)]
pub enum ConnError {
    #[error("connection I/O failed")]
    Io(#[from] io::Error),
    #[error("protocol violation")]
    Wire(#[from] wire::WireError),
    #[error("the handshake's options took longer than {0:?} to arrive")]
    HandshakeTimeout(Duration),
    #[error("export {name:?} cannot be served: {why}")]
    Export { name: String, why: String },
    #[error("the client sent {0} bytes after NBD_OPT_STARTTLS before the TLS handshake; closed (they could be injected in clear text)")]
    DataAfterStartTls(usize),
    #[error("TLS handshake failed")]
    Tls(#[from] TlsError),
    #[error("a READ reply was cut short after its header went out; closed, as the protocol asks")]
    ReplyCut,
}

/// An accepted connection, async during the handshake. After `NBD_OPT_STARTTLS` it is the
/// TLS session on the same socket.
pub enum Sock {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
    Tls(tls::AsyncSession),
}

impl Sock {
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf).await,
            Self::Tcp(s) => s.read(buf).await,
            Self::Tls(s) => s.read(buf).await,
        }
    }

    pub async fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.write_all(b).await,
            Self::Tcp(s) => s.write_all(b).await,
            Self::Tls(s) => s.write_all(b).await,
        }
    }

    pub async fn shutdown(&mut self) {
        let _ = match self {
            Self::Unix(s) => s.shutdown().await,
            Self::Tcp(s) => s.shutdown().await,
            Self::Tls(s) => s.shutdown().await,
        };
    }

    /// The same connection, blocking, for the transmission threads.
    pub fn into_std(self) -> io::Result<StdSock> {
        let p = match self {
            Self::Tls(s) => return Ok(StdSock::Tls(s.into_std()?)),
            Self::Unix(s) => Plain::Unix(s.into_std()?),
            Self::Tcp(s) => Plain::Tcp(s.into_std()?),
        };
        p.set_nonblocking(false)?;
        Ok(StdSock::Plain(p))
    }
}

/// A std socket of either kind.
pub enum Plain {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Plain {
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Unix(s) => Self::Unix(s.try_clone()?),
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: std::net::Shutdown) {
        let _ = match self {
            Self::Unix(s) => s.shutdown(how),
            Self::Tcp(s) => s.shutdown(how),
        };
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.set_nonblocking(on),
            Self::Tcp(s) => s.set_nonblocking(on),
        }
    }
}

impl Read for Plain {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Plain {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads and writes through a shared reference, as `&UnixStream` and `&TcpStream` do.
impl Read for &Plain {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Plain::Unix(s) => (&mut &*s).read(buf),
            Plain::Tcp(s) => (&mut &*s).read(buf),
        }
    }
}

impl Write for &Plain {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Plain::Unix(s) => (&mut &*s).write(buf),
            Plain::Tcp(s) => (&mut &*s).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A blocking connection of the transmission phase: a plain socket, or a TLS session that
/// the connection's threads share (one reads requests while another writes a reply, each
/// through the session's own lock, with no extra copy or socket between them).
pub enum StdSock {
    Plain(Plain),
    Tls(tls::TlsSock),
}

impl StdSock {
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Plain(s) => Self::Plain(s.try_clone()?),
            Self::Tls(s) => Self::Tls(s.try_clone()?),
        })
    }

    /// `Read`: later reads see the end of the stream (in flight replies still go out).
    /// `Both`: a TLS session says `close_notify` first.
    pub fn shutdown(&self, how: std::net::Shutdown) {
        match self {
            Self::Plain(s) => s.shutdown(how),
            Self::Tls(s) => s.shutdown(how),
        }
    }
}

impl Read for StdSock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for StdSock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bytes received and not yet parsed.
pub struct Inbox {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for Inbox {
    fn default() -> Self {
        Self {
            buf: vec![0; RECV_BUF],
            start: 0,
            end: 0,
        }
    }
}

impl Inbox {
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Make room for `need` bytes from `start`; `need` is bounded by the parsers (a request
    /// header, or an option of at most `MAX_OPTION`), so the buffer never grows past
    /// `RECV_BUF` in practice.
    fn room(&mut self, need: usize) {
        if self.start + need > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if need > self.buf.len() {
                self.buf.resize(need, 0);
            }
        }
    }

    /// Read until at least `need` bytes are buffered. False at end of stream.
    pub async fn fill(&mut self, sock: &mut Sock, need: usize) -> io::Result<bool> {
        self.room(need);
        while self.len() < need {
            let n = sock.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Ok(false);
            }
            self.end += n;
        }
        Ok(true)
    }

    /// The same, blocking.
    pub fn fill_sync(&mut self, sock: &mut StdSock, need: usize) -> io::Result<bool> {
        self.room(need);
        while self.len() < need {
            let n = sock.read(&mut self.buf[self.end..])?;
            if n == 0 {
                return Ok(false);
            }
            self.end += n;
        }
        Ok(true)
    }

    /// Fill `dst` with the next bytes of the stream: what is buffered first, then straight
    /// from the socket. An end of stream before `dst` is full is an error.
    pub fn read_exact_sync(&mut self, sock: &mut StdSock, dst: &mut [u8]) -> io::Result<()> {
        let n = self.len().min(dst.len());
        dst[..n].copy_from_slice(&self.data()[..n]);
        self.consume(n);
        if n < dst.len() {
            sock.read_exact(&mut dst[n..])?;
        }
        Ok(())
    }

    /// Skip the next `n` bytes of the stream (a refused WRITE's payload), in pieces the
    /// size of the inbox.
    pub fn discard_sync(&mut self, sock: &mut StdSock, mut n: u64) -> io::Result<()> {
        while n > 0 {
            if self.len() == 0 && !self.fill_sync(sock, 1)? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let k = (self.len() as u64).min(n) as usize;
            self.consume(k);
            n -= k as u64;
        }
        Ok(())
    }
}

/// The time a client may spend sending its handshake: every wait for its bytes counts
/// against it (the server's own work, such as a reclaim, does not), so a client that
/// sends one option at a time, each just in time, cannot hold a connection slot for long.
pub struct Allowance {
    left: Duration,
    total: Duration,
}

impl Allowance {
    pub fn new(total: Duration) -> Self {
        Self { left: total, total }
    }

    /// Run `f`, a wait for the client, within what is left; what it took is spent.
    pub async fn wait<F: std::future::Future>(&mut self, f: F) -> Result<F::Output, ConnError> {
        let t0 = tokio::time::Instant::now();
        let r = tokio::time::timeout(self.left, f).await;
        self.left = self.left.saturating_sub(t0.elapsed());
        r.map_err(|_| ConnError::HandshakeTimeout(self.total))
    }

    pub fn left(&self) -> Duration {
        self.left
    }
}

/// Read one frame during the handshake, within the client's allowance. None at end of
/// stream.
pub async fn read_frame<T, F>(
    inbox: &mut Inbox,
    sock: &mut Sock,
    allowance: &mut Allowance,
    mut parse: F,
) -> Result<Option<(T, usize)>, ConnError>
where
    F: FnMut(&[u8]) -> Result<Frame<T>, wire::WireError>,
{
    loop {
        match parse(inbox.data())? {
            Frame::Complete(v, n) => return Ok(Some((v, n))),
            Frame::Incomplete { need } => match allowance.wait(inbox.fill(sock, need)).await {
                Err(e) => return Err(e),
                Ok(r) => {
                    if !r? {
                        return Ok(None);
                    }
                }
            },
        }
    }
}
