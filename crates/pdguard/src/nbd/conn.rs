//! One NBD connection: the fixed newstyle handshake (options until `NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`, async, as it may wait for a reclaim), then transmission on
//! threads, as nbdkit does: each of a connection's worker threads in turn reads a request,
//! parses and checks it with `wire` before any I/O, passes the disk's gate (FIG. 3: open,
//! held while blocked, refused or read-only when sealed), does the I/O with the gate's
//! guard held, drops the guard and writes the reply. Many requests are in flight at once
//! and replies go out as they finish, possibly out of order.

use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use pdguard_engine::gate::{Gate, GateError};
use pdguard_engine::service::{NbdExport, Service};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::backend::{nbd_errno, Backend, MAX_EXTENTS};
use super::wire::{self, cmdflag, errno, info, opt, rep, tflag, Command, Frame, Request};

/// Largest READ or WRITE payload (the spec's interoperable maximum, 2^25).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option data accepted during the handshake.
const MAX_OPTION: u32 = 64 << 10;
/// Bytes of request payloads and read buffers one connection may hold at once, in units.
const BUDGET_UNIT: u32 = 4096;
const BUDGET_UNITS: u32 = (64 << 20) / BUDGET_UNIT;
/// Every request costs at least this many units, which bounds the requests in flight.
const MIN_COST: u32 = 4;
/// The metadata context id of `base:allocation`.
const BASE_ALLOCATION_ID: u32 = 1;
/// Initial size of the receive buffer.
const RECV_BUF: usize = 256 << 10;
/// Worker threads per connection in transmission (nbdkit's default is 16 too).
const WORKERS: usize = 16;

#[derive(Debug, Error)]
pub enum ConnError {
    #[error("connection I/O failed")]
    Io(#[from] io::Error),
    #[error("protocol violation")]
    Wire(#[from] wire::WireError),
    #[error("no complete option within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("export {name:?} cannot be served: {why}")]
    Export { name: String, why: String },
}

/// Settings shared by every connection.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// How long a request waits at a blocked gate before `EIO` (`--nbd-hold`).
    pub hold: Duration,
    /// How long the handshake may wait for each option.
    pub handshake_timeout: Duration,
}

/// An accepted connection, async during the handshake.
pub enum Sock {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl Sock {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf).await,
            Self::Tcp(s) => s.read(buf).await,
        }
    }

    async fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.write_all(b).await,
            Self::Tcp(s) => s.write_all(b).await,
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Self::Unix(s) => s.shutdown().await,
            Self::Tcp(s) => s.shutdown().await,
        };
    }

    /// The same socket, blocking, for the transmission threads.
    fn into_std(self) -> io::Result<StdSock> {
        let s = match self {
            Self::Unix(s) => StdSock::Unix(s.into_std()?),
            Self::Tcp(s) => StdSock::Tcp(s.into_std()?),
        };
        match &s {
            StdSock::Unix(u) => u.set_nonblocking(false)?,
            StdSock::Tcp(t) => t.set_nonblocking(false)?,
        }
        Ok(s)
    }
}

/// A blocking socket.
enum StdSock {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl StdSock {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Unix(s) => Self::Unix(s.try_clone()?),
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for StdSock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for StdSock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bytes received and not yet parsed.
struct Inbox {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Inbox {
    fn new() -> Self {
        Self {
            buf: vec![0; RECV_BUF],
            start: 0,
            end: 0,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Make room for `need` bytes from `start`. `need` is bounded by the parser (a request
    /// header plus at most `MAX_PAYLOAD`, or an option header plus at most `MAX_OPTION`).
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
    async fn fill(&mut self, sock: &mut Sock, need: usize) -> io::Result<bool> {
        self.room(need);
        while self.end - self.start < need {
            let n = sock.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Ok(false);
            }
            self.end += n;
        }
        Ok(true)
    }

    /// The same, blocking.
    fn fill_sync(&mut self, sock: &mut StdSock, need: usize) -> io::Result<bool> {
        self.room(need);
        while self.end - self.start < need {
            let n = sock.read(&mut self.buf[self.end..])?;
            if n == 0 {
                return Ok(false);
            }
            self.end += n;
        }
        Ok(true)
    }
}

/// What the handshake agreed on.
struct Agreed {
    export: NbdExport,
    backend: Backend,
    structured: bool,
    meta: bool,
}

fn transmission_flags(structured: bool) -> u16 {
    // CAN_MULTI_CONN holds: every connection to a disk does positional I/O on the same
    // file through the same page cache, and FLUSH/FUA call fdatasync, which persists the
    // file's dirty pages whichever descriptor wrote them.
    let mut f = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        | tflag::SEND_FUA
        | tflag::SEND_TRIM
        | tflag::SEND_WRITE_ZEROES
        | tflag::SEND_CACHE
        | tflag::CAN_MULTI_CONN;
    if structured {
        // A READ is always answered with a single content chunk.
        f |= tflag::SEND_DF;
    }
    f
}

/// Serve one connection to its end. `id` is the container name of its association.
pub async fn serve(mut sock: Sock, id: String, svc: Service, cfg: Arc<ConnConfig>) {
    let mut inbox = Inbox::new();
    let mut attached = false;
    let result = match handshake(&mut inbox, &mut sock, &id, &svc, &cfg, &mut attached).await {
        Ok(Some(agreed)) => {
            tracing::info!(conn = %id, disk = %agreed.export.name, "NBD transmission");
            transmit(inbox, sock, agreed, &svc, &cfg, &id).await
        }
        Ok(None) => {
            sock.shutdown().await;
            Ok(())
        }
        Err(e) => {
            sock.shutdown().await;
            Err(e)
        }
    };
    if let Err(e) = result {
        tracing::warn!(conn = %id, error = %pdguard_engine::error_chain(&e), "NBD connection closed");
    }
    if attached {
        svc.nbd_detach(&id).await;
    }
}

/// Read one frame during the handshake, within the handshake timeout. None at end of stream.
async fn next_frame<T, F>(
    inbox: &mut Inbox,
    sock: &mut Sock,
    cfg: &ConnConfig,
    mut parse: F,
) -> Result<Option<(T, usize)>, ConnError>
where
    F: FnMut(&[u8]) -> Result<Frame<T>, wire::WireError>,
{
    loop {
        match parse(inbox.data())? {
            Frame::Complete(v, n) => return Ok(Some((v, n))),
            Frame::Incomplete { need } => {
                match tokio::time::timeout(cfg.handshake_timeout, inbox.fill(sock, need)).await {
                    Err(_) => return Err(ConnError::HandshakeTimeout(cfg.handshake_timeout)),
                    Ok(r) => {
                        if !r? {
                            return Ok(None);
                        }
                    }
                }
            }
        }
    }
}

/// Option haggling. `Some` when transmission starts; `attached` is set as soon as the
/// connection is associated with its disk.
async fn handshake(
    inbox: &mut Inbox,
    w: &mut Sock,
    id: &str,
    svc: &Service,
    cfg: &ConnConfig,
    attached: &mut bool,
) -> Result<Option<Agreed>, ConnError> {
    w.write_all(&wire::greeting()).await?;
    let Some((flags, n)) = next_frame(inbox, w, cfg, wire::parse_client_flags).await? else {
        return Ok(None);
    };
    inbox.consume(n);
    let mut structured = false;
    // The export for which base:allocation was selected, if any.
    let mut meta_for: Option<String> = None;
    loop {
        let Some(((code, data), n)) = next_frame(inbox, w, cfg, |b| {
            Ok(match wire::parse_option(b, MAX_OPTION)? {
                Frame::Complete(o, n) => Frame::Complete((o.code, o.data.to_vec()), n),
                Frame::Incomplete { need } => Frame::Incomplete { need },
            })
        })
        .await?
        else {
            return Ok(None);
        };
        inbox.consume(n);
        let reply = |rtype: u32, d: &[u8]| wire::option_reply(code, rtype, d);
        let fail = |rtype: u32, msg: &str| wire::option_error(code, rtype, msg);
        match code {
            opt::EXPORT_NAME => {
                // No error reply exists for this option: an export it cannot serve closes
                // the connection (proto.md "NBD_OPT_EXPORT_NAME").
                let name = String::from_utf8(data).map_err(|_| ConnError::Export {
                    name: "?".into(),
                    why: "the name is not UTF-8".into(),
                })?;
                let agreed = go(svc, id, &name, structured, &meta_for, attached)
                    .await
                    .map_err(|why| ConnError::Export {
                        name: name.clone(),
                        why,
                    })?;
                let flags_out = transmission_flags(structured);
                w.write_all(&wire::export_name_reply(
                    agreed.export.size,
                    flags_out,
                    flags.no_zeroes,
                ))
                .await?;
                return Ok(Some(agreed));
            }
            opt::ABORT => {
                w.write_all(&reply(rep::ACK, &[])).await?;
                return Ok(None);
            }
            opt::LIST if !data.is_empty() => {
                w.write_all(&fail(rep::ERR_INVALID, "NBD_OPT_LIST takes no data"))
                    .await?;
            }
            opt::LIST => {
                let mut out = Vec::new();
                for e in svc.nbd_exports().await {
                    out.extend(reply(
                        rep::SERVER,
                        &wire::rep_server(&e.name, &describe(&e)),
                    ));
                }
                out.extend(reply(rep::ACK, &[]));
                w.write_all(&out).await?;
            }
            opt::INFO | opt::GO => {
                let req = match wire::parse_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        w.write_all(&fail(rep::ERR_INVALID, &e.0)).await?;
                        continue;
                    }
                };
                let found = if code == opt::GO {
                    go(svc, id, &req.name, structured, &meta_for, attached)
                        .await
                        .map(|a| (a.export.clone(), Some(a)))
                } else {
                    svc.nbd_export(&req.name)
                        .await
                        .map(|e| (e, None))
                        .map_err(|e| pdguard_engine::error_chain(&e))
                };
                let (export, agreed) = match found {
                    Ok(x) => x,
                    Err(why) => {
                        w.write_all(&fail(rep::ERR_UNKNOWN, &why)).await?;
                        continue;
                    }
                };
                let mut out = reply(
                    rep::INFO,
                    &wire::info_export(export.size, transmission_flags(structured)),
                );
                out.extend(reply(
                    rep::INFO,
                    &wire::info_block_size(1, 4096, MAX_PAYLOAD),
                ));
                out.extend(reply(
                    rep::INFO,
                    &wire::info_string(info::DESCRIPTION, &describe(&export)),
                ));
                if req.infos.contains(&info::NAME) {
                    out.extend(reply(
                        rep::INFO,
                        &wire::info_string(info::NAME, &export.name),
                    ));
                }
                out.extend(reply(rep::ACK, &[]));
                w.write_all(&out).await?;
                if agreed.is_some() {
                    return Ok(agreed);
                }
            }
            opt::STRUCTURED_REPLY if !data.is_empty() => {
                let m = "NBD_OPT_STRUCTURED_REPLY takes no data";
                w.write_all(&fail(rep::ERR_INVALID, m)).await?;
            }
            opt::STRUCTURED_REPLY => {
                structured = true;
                w.write_all(&reply(rep::ACK, &[])).await?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = code == opt::SET_META_CONTEXT;
                if set {
                    // Replaces the selection, even when it fails.
                    meta_for = None;
                }
                let out = meta_context(svc, code, &data, structured, set, &mut meta_for).await;
                w.write_all(&out).await?;
            }
            opt::STARTTLS => {
                let m = "TLS is not supported yet; use a unix socket or a loopback address";
                w.write_all(&fail(rep::ERR_UNSUP, m)).await?;
            }
            other => {
                let m = format!("option {other} is not supported by pdguard");
                w.write_all(&fail(rep::ERR_UNSUP, &m)).await?;
            }
        }
    }
}

fn describe(e: &NbdExport) -> String {
    format!(
        "pdguard disk {} ({} bytes, {})",
        e.name,
        e.size,
        e.state.name()
    )
}

/// The replies to a LIST or SET of meta contexts.
async fn meta_context(
    svc: &Service,
    code: u32,
    data: &[u8],
    structured: bool,
    set: bool,
    meta_for: &mut Option<String>,
) -> Vec<u8> {
    let fail = |rtype: u32, msg: &str| wire::option_error(code, rtype, msg);
    if !structured {
        return fail(
            rep::ERR_INVALID,
            "negotiate NBD_OPT_STRUCTURED_REPLY before meta contexts",
        );
    }
    let req = match wire::parse_meta_request(data) {
        Ok(r) => r,
        Err(e) => return fail(rep::ERR_INVALID, &e.0),
    };
    if let Err(e) = svc.nbd_export(&req.name).await {
        return fail(rep::ERR_UNKNOWN, &pdguard_engine::error_chain(&e));
    }
    let mut out = Vec::new();
    if wire::base_allocation_matches(&req.queries, !set) {
        // LIST replies carry the reserved id 0; SET assigns ours.
        let ctx = if set { BASE_ALLOCATION_ID } else { 0 };
        out.extend(wire::option_reply(
            code,
            rep::META_CONTEXT,
            &wire::rep_meta_context(ctx, wire::BASE_ALLOCATION),
        ));
        if set {
            *meta_for = Some(req.name);
        }
    }
    out.extend(wire::option_reply(code, rep::ACK, &[]));
    out
}

/// Enter transmission on `name`: associate the connection with the disk (a reclaim waits
/// for the unseal) and open its file.
async fn go(
    svc: &Service,
    id: &str,
    name: &str,
    structured: bool,
    meta_for: &Option<String>,
    attached: &mut bool,
) -> Result<Agreed, String> {
    // Unknown names fail before any association.
    svc.nbd_export(name)
        .await
        .map_err(|e| pdguard_engine::error_chain(&e))?;
    // nbd_attach undoes the association itself when the reclaim fails.
    let export = svc
        .nbd_attach(id, name)
        .await
        .map_err(|e| pdguard_engine::error_chain(&e))?;
    *attached = true;
    let (path, size) = (export.path.clone(), export.size);
    let backend = tokio::task::spawn_blocking(move || Backend::open(&path, size))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot open {}: {e}", export.path.display()))?;
    Ok(Agreed {
        meta: meta_for.as_deref() == Some(name),
        export,
        backend,
        structured,
    })
}

/// What every worker of a connection shares.
struct Ctx {
    gate: Arc<Gate>,
    backend: Backend,
    /// The receiving side: the worker that holds it reads the next request, as in nbdkit
    /// (no hand-off between a reader and a worker).
    rx: Mutex<Receiver>,
    w: Mutex<StdSock>,
    structured: bool,
    session: wire::Session,
    hold: Duration,
    disk: String,
    id: String,
    budget: Budget,
}

struct Receiver {
    inbox: Inbox,
    sock: StdSock,
    /// Set when reading ended: DISC, end of stream, or a protocol violation.
    done: Option<Result<(), ConnError>>,
}

/// A request to run, with its cost in budget units.
struct Job {
    req: Request,
    payload: Vec<u8>,
    cost: u32,
}

/// Bytes of payloads and read buffers in flight, in units: the reader waits when it is
/// used up (back-pressure on the socket), so memory stays bounded.
#[derive(Default)]
struct Budget {
    /// Units in use, and whether the reader waits for some to be freed.
    used: Mutex<(u32, bool)>,
    freed: Condvar,
}

impl Budget {
    fn acquire(&self, n: u32) {
        let mut u = lock(&self.used);
        while u.0 + n > BUDGET_UNITS && u.0 > 0 {
            u.1 = true;
            u = self.freed.wait(u).unwrap_or_else(|p| p.into_inner());
        }
        u.0 += n;
    }

    fn release(&self, n: u32) {
        let mut u = lock(&self.used);
        u.0 -= n;
        // A wake-up costs a system call: only when someone waits.
        if std::mem::take(&mut u.1) {
            self.freed.notify_all();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The transmission phase, until `NBD_CMD_DISC`, end of stream or a protocol violation,
/// on threads; requests in flight finish (and are answered) before it returns.
async fn transmit(
    inbox: Inbox,
    sock: Sock,
    agreed: Agreed,
    svc: &Service,
    cfg: &ConnConfig,
    id: &str,
) -> Result<(), ConnError> {
    let sock = sock.into_std()?;
    let ctx = Arc::new(Ctx {
        gate: svc.gate(&agreed.export.name),
        w: Mutex::new(sock.try_clone()?),
        rx: Mutex::new(Receiver {
            inbox,
            sock,
            done: None,
        }),
        structured: agreed.structured,
        session: wire::Session {
            size: agreed.backend.size(),
            structured: agreed.structured,
            meta: agreed.meta,
        },
        hold: cfg.hold,
        disk: agreed.export.name.clone(),
        id: id.to_string(),
        budget: Budget::default(),
        backend: agreed.backend,
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            let _ = tx.send(transmit_blocking(&ctx));
        })?;
    rx.await.unwrap_or(Ok(()))
}

fn transmit_blocking(ctx: &Arc<Ctx>) -> Result<(), ConnError> {
    let mut workers = Vec::with_capacity(WORKERS);
    for _ in 1..WORKERS {
        let c = Arc::clone(ctx);
        match std::thread::Builder::new()
            .name("nbd-io".into())
            .spawn(move || worker(&c))
        {
            Ok(h) => workers.push(h),
            Err(e) => {
                tracing::warn!(error = %e, "fewer NBD worker threads than planned");
                break;
            }
        }
    }
    worker(ctx);
    for w in workers {
        let _ = w.join();
    }
    let mut r = lock(&ctx.rx);
    r.sock.shutdown();
    r.done.take().unwrap_or(Ok(()))
}

/// Take the next request, run it, answer it; until reading ends.
fn worker(ctx: &Ctx) {
    // Each worker reuses one read buffer: no allocation or zeroing per READ.
    let mut scratch = Vec::new();
    loop {
        let job = {
            let mut r = lock(&ctx.rx);
            if r.done.is_some() {
                return;
            }
            match next_request(&mut r, ctx) {
                Ok(Some(job)) => job,
                Ok(None) => {
                    r.done = Some(Ok(()));
                    return;
                }
                Err(e) => {
                    r.done = Some(Err(e));
                    return;
                }
            }
        };
        run(ctx, &job.req, &job.payload, &mut scratch);
        ctx.budget.release(job.cost);
    }
}

/// Read requests until one is to be run, answering refused ones on the way. None at
/// `NBD_CMD_DISC` or end of stream.
fn next_request(r: &mut Receiver, ctx: &Ctx) -> Result<Option<Job>, ConnError> {
    loop {
        let (req, used) = match wire::parse_request(r.inbox.data(), MAX_PAYLOAD)? {
            Frame::Complete(req, n) => (req, n),
            Frame::Incomplete { need } => {
                if !r.inbox.fill_sync(&mut r.sock, need)? {
                    return Ok(None);
                }
                continue;
            }
        };
        let payload = if req.cmd == Command::Write {
            r.inbox.data()[wire::REQUEST_LEN..used].to_vec()
        } else {
            Vec::new()
        };
        r.inbox.consume(used);
        if let Err(refusal) = wire::check(&req, &ctx.session) {
            tracing::debug!(conn = %ctx.id, why = %refusal.why, "request refused");
            reply_error(ctx, &req, refusal.errno, &refusal.why)?;
            continue;
        }
        if req.cmd == Command::Disc {
            return Ok(None);
        }
        let cost = match req.cmd {
            Command::Read | Command::Write => req.len.div_ceil(BUDGET_UNIT).max(MIN_COST),
            _ => MIN_COST,
        };
        ctx.budget.acquire(cost);
        return Ok(Some(Job { req, payload, cost }));
    }
}

/// What a request produced.
enum Done {
    Ok,
    /// A READ: the worker's buffer holds the header's room, then the data.
    Read,
    Extents(Vec<(u32, u32)>),
}

fn send(ctx: &Ctx, bytes: &[u8]) -> io::Result<()> {
    lock(&ctx.w).write_all(bytes)
}

/// Run one request through the gate and answer it.
fn run(ctx: &Ctx, req: &Request, payload: &[u8], scratch: &mut Vec<u8>) {
    let sent = match execute(ctx, req, payload, scratch) {
        Ok(Done::Ok) => send(ctx, &wire::simple_reply(req.cookie, 0)),
        Ok(Done::Read) => {
            let buf = &mut scratch[..28 + req.len as usize];
            if ctx.structured {
                let h = wire::offset_data_header(req.cookie, req.offset, req.len);
                buf[..28].copy_from_slice(&h);
                send(ctx, buf)
            } else {
                buf[12..28].copy_from_slice(&wire::simple_reply(req.cookie, 0));
                send(ctx, &buf[12..])
            }
        }
        Ok(Done::Extents(e)) => send(
            ctx,
            &wire::block_status_chunk(req.cookie, BASE_ALLOCATION_ID, &e),
        ),
        Err((code, msg)) => reply_error(ctx, req, code, &msg),
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "cannot send a reply; the client is gone");
    }
}

fn reply_error(ctx: &Ctx, req: &Request, code: u32, msg: &str) -> io::Result<()> {
    if ctx.structured {
        send(ctx, &wire::error_chunk(req.cookie, code, msg))
    } else {
        send(ctx, &wire::simple_reply(req.cookie, code))
    }
}

/// The gate (FIG. 3), then the I/O with the gate's guard held. The guard is dropped before
/// the reply is sent, so a slow client never delays a seal.
fn execute(
    ctx: &Ctx,
    req: &Request,
    payload: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<Done, (u32, String)> {
    let guard = ctx.gate.enter(req.cmd.writes(), ctx.hold).map_err(|e| {
        let code = match e {
            GateError::Timeout(_) => errno::EIO,
            GateError::SealedReadOnly | GateError::SealedRefused => errno::EPERM,
        };
        (code, format!("disk {}: {e}", ctx.disk))
    })?;
    let b = &ctx.backend;
    let fua = req.flags & cmdflag::FUA != 0;
    let (off, len) = (req.offset, u64::from(req.len));
    let r = match req.cmd {
        Command::Read => {
            let n = 28 + req.len as usize;
            if scratch.len() < n {
                scratch.resize(n, 0);
            }
            b.read(&mut scratch[28..n], off).map(|()| Done::Read)
        }
        Command::Write => b.write(payload, off, fua).map(|()| Done::Ok),
        Command::Flush => b.flush().map(|()| Done::Ok),
        Command::Trim => b.trim(off, len, fua).map(|()| Done::Ok),
        Command::WriteZeroes => {
            let may_trim = req.flags & cmdflag::NO_HOLE == 0;
            b.zero(off, len, may_trim, fua).map(|()| Done::Ok)
        }
        Command::Cache => b.cache(off, len).map(|()| Done::Ok),
        Command::BlockStatus => {
            let max = if req.flags & cmdflag::REQ_ONE != 0 {
                1
            } else {
                MAX_EXTENTS
            };
            b.extents(off, len, max).map(Done::Extents)
        }
        // Checked before: DISC never runs, unknown commands were refused.
        Command::Disc | Command::Unknown(_) => Ok(Done::Ok),
    };
    drop(guard);
    r.map_err(|e| {
        tracing::warn!(disk = %ctx.disk, cmd = req.cmd.name(), error = %e, "NBD I/O failed");
        (
            nbd_errno(&e),
            format!("disk {}: {} failed: {e}", ctx.disk, req.cmd.name()),
        )
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn budget_holds_the_reader_until_units_are_freed() {
        let b = Arc::new(Budget::default());
        b.acquire(BUDGET_UNITS - 1);
        let (tx, rx) = std::sync::mpsc::channel();
        let b2 = Arc::clone(&b);
        std::thread::spawn(move || {
            b2.acquire(2);
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "over budget"
        );
        b.release(BUDGET_UNITS - 1);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the release did not wake the waiting reader");
        // A request larger than the whole budget still runs when nothing else is in flight.
        b.release(2);
        b.acquire(BUDGET_UNITS + 5);
        b.release(BUDGET_UNITS + 5);
        assert_eq!(*lock(&b.used), (0, false));
    }
}
