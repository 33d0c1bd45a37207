//! One NBD connection: the fixed newstyle handshake (options until `NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`), then transmission. Every request is parsed and checked by
//! `wire` before any I/O, then runs in its own task: it passes the disk's gate (FIG. 3:
//! open, held while blocked, refused or read-only when sealed), does its I/O on a blocking
//! thread with the gate's guard held, drops the guard and sends its reply. Many requests
//! are in flight at once and replies go out as they finish, possibly out of order.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use pdguard_engine::gate::{Gate, GateError};
use pdguard_engine::service::{NbdExport, Service};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

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

pub type Reader = Box<dyn AsyncRead + Unpin + Send>;
pub type Writer = Box<dyn AsyncWrite + Unpin + Send>;
type SharedWriter = Arc<Mutex<Writer>>;

/// Bytes received and not yet parsed.
struct Inbox {
    r: Reader,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Inbox {
    fn new(r: Reader) -> Self {
        Self {
            r,
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

    /// Read until at least `need` bytes are buffered. False at end of stream. `need` is
    /// bounded by the parser (a request header plus at most `MAX_PAYLOAD`, or an option
    /// header plus at most `MAX_OPTION`).
    async fn fill(&mut self, need: usize) -> io::Result<bool> {
        if self.start + need > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if need > self.buf.len() {
                self.buf.resize(need, 0);
            }
        }
        while self.end - self.start < need {
            let n = self.r.read(&mut self.buf[self.end..]).await?;
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
pub async fn serve(r: Reader, w: Writer, id: String, svc: Service, cfg: Arc<ConnConfig>) {
    let mut inbox = Inbox::new(r);
    let w: SharedWriter = Arc::new(Mutex::new(w));
    let mut attached = false;
    let result = match handshake(&mut inbox, &w, &id, &svc, &cfg, &mut attached).await {
        Ok(Some(agreed)) => {
            tracing::info!(conn = %id, disk = %agreed.export.name, "NBD transmission");
            transmit(inbox, Arc::clone(&w), agreed, &svc, &cfg, &id).await
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::warn!(conn = %id, error = %pdguard_engine::error_chain(&e), "NBD connection closed");
    }
    if attached {
        svc.nbd_detach(&id).await;
    }
    let _ = w.lock().await.shutdown().await;
}

async fn send(w: &SharedWriter, bytes: &[u8]) -> io::Result<()> {
    w.lock().await.write_all(bytes).await
}

/// Read one frame during the handshake, within the handshake timeout. None at end of stream.
async fn next_frame<T, F>(
    inbox: &mut Inbox,
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
                match tokio::time::timeout(cfg.handshake_timeout, inbox.fill(need)).await {
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
    w: &SharedWriter,
    id: &str,
    svc: &Service,
    cfg: &ConnConfig,
    attached: &mut bool,
) -> Result<Option<Agreed>, ConnError> {
    send(w, &wire::greeting()).await?;
    let Some((flags, n)) = next_frame(inbox, cfg, wire::parse_client_flags).await? else {
        return Ok(None);
    };
    inbox.consume(n);
    let mut structured = false;
    // The export for which base:allocation was selected, if any.
    let mut meta_for: Option<String> = None;
    loop {
        let Some(((code, data), n)) = next_frame(inbox, cfg, |b| {
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
                send(
                    w,
                    &wire::export_name_reply(agreed.export.size, flags_out, flags.no_zeroes),
                )
                .await?;
                return Ok(Some(agreed));
            }
            opt::ABORT => {
                send(w, &reply(rep::ACK, &[])).await?;
                return Ok(None);
            }
            opt::LIST if !data.is_empty() => {
                send(w, &fail(rep::ERR_INVALID, "NBD_OPT_LIST takes no data")).await?;
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
                send(w, &out).await?;
            }
            opt::INFO | opt::GO => {
                let req = match wire::parse_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        send(w, &fail(rep::ERR_INVALID, &e.0)).await?;
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
                        send(w, &fail(rep::ERR_UNKNOWN, &why)).await?;
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
                send(w, &out).await?;
                if agreed.is_some() {
                    return Ok(agreed);
                }
            }
            opt::STRUCTURED_REPLY if !data.is_empty() => {
                let m = "NBD_OPT_STRUCTURED_REPLY takes no data";
                send(w, &fail(rep::ERR_INVALID, m)).await?;
            }
            opt::STRUCTURED_REPLY => {
                structured = true;
                send(w, &reply(rep::ACK, &[])).await?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = code == opt::SET_META_CONTEXT;
                if set {
                    // Replaces the selection, even when it fails.
                    meta_for = None;
                }
                let out = meta_context(svc, code, &data, structured, set, &mut meta_for).await;
                send(w, &out).await?;
            }
            opt::STARTTLS => {
                let m = "TLS is not supported yet; use a unix socket or a loopback address";
                send(w, &fail(rep::ERR_UNSUP, m)).await?;
            }
            other => {
                let m = format!("option {other} is not supported by pdguard");
                send(w, &fail(rep::ERR_UNSUP, &m)).await?;
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

/// What every request task of a connection shares.
struct Ctx {
    gate: Arc<Gate>,
    backend: Arc<Backend>,
    w: SharedWriter,
    structured: bool,
    hold: Duration,
    disk: String,
}

/// The transmission phase, until `NBD_CMD_DISC`, end of stream or a protocol violation.
/// Requests in flight finish (and are answered) before it returns.
async fn transmit(
    mut inbox: Inbox,
    w: SharedWriter,
    agreed: Agreed,
    svc: &Service,
    cfg: &ConnConfig,
    id: &str,
) -> Result<(), ConnError> {
    let session = wire::Session {
        size: agreed.backend.size(),
        structured: agreed.structured,
        meta: agreed.meta,
    };
    let ctx = Arc::new(Ctx {
        gate: svc.gate(&agreed.export.name),
        backend: Arc::new(agreed.backend),
        w,
        structured: agreed.structured,
        hold: cfg.hold,
        disk: agreed.export.name.clone(),
    });
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
    let mut tasks = JoinSet::new();
    let result = loop {
        while tasks.try_join_next().is_some() {}
        let (req, used) = match wire::parse_request(inbox.data(), MAX_PAYLOAD) {
            Ok(Frame::Complete(r, n)) => (r, n),
            Ok(Frame::Incomplete { need }) => match inbox.fill(need).await {
                Ok(true) => continue,
                Ok(false) => break Ok(()),
                Err(e) => break Err(e.into()),
            },
            Err(e) => break Err(e.into()),
        };
        let payload = if req.cmd == Command::Write {
            inbox.data()[wire::REQUEST_LEN..used].to_vec()
        } else {
            Vec::new()
        };
        inbox.consume(used);
        if let Err(r) = wire::check(&req, &session) {
            tracing::debug!(conn = %id, why = %r.why, "request refused");
            if let Err(e) = reply_error(&ctx, &req, r.errno, &r.why).await {
                break Err(e.into());
            }
            continue;
        }
        if req.cmd == Command::Disc {
            break Ok(());
        }
        let cost = match req.cmd {
            Command::Read | Command::Write => req.len.div_ceil(BUDGET_UNIT).max(MIN_COST),
            _ => MIN_COST,
        };
        let Ok(permit) = Arc::clone(&budget).acquire_many_owned(cost).await else {
            break Ok(());
        };
        let ctx = Arc::clone(&ctx);
        tasks.spawn(async move {
            let _permit = permit;
            run(&ctx, req, payload).await
        });
    };
    while tasks.join_next().await.is_some() {}
    result
}

/// What a request produced.
enum Done {
    Ok,
    /// A READ buffer: the header's room, then the data.
    Read(Vec<u8>),
    Extents(Vec<(u32, u32)>),
}

/// Run one request through the gate and answer it.
async fn run(ctx: &Ctx, req: Request, payload: Vec<u8>) {
    let r = execute(ctx, &req, payload).await;
    let sent = match r {
        Ok(Done::Ok) => send(&ctx.w, &wire::simple_reply(req.cookie, 0)).await,
        Ok(Done::Read(mut buf)) => {
            if ctx.structured {
                buf[..28]
                    .copy_from_slice(&wire::offset_data_header(req.cookie, req.offset, req.len));
                send(&ctx.w, &buf).await
            } else {
                buf[12..28].copy_from_slice(&wire::simple_reply(req.cookie, 0));
                send(&ctx.w, &buf[12..]).await
            }
        }
        Ok(Done::Extents(e)) => {
            send(
                &ctx.w,
                &wire::block_status_chunk(req.cookie, BASE_ALLOCATION_ID, &e),
            )
            .await
        }
        Err((code, msg)) => reply_error(ctx, &req, code, &msg).await,
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "cannot send a reply; the client is gone");
    }
}

async fn reply_error(ctx: &Ctx, req: &Request, code: u32, msg: &str) -> io::Result<()> {
    if ctx.structured {
        send(&ctx.w, &wire::error_chunk(req.cookie, code, msg)).await
    } else {
        send(&ctx.w, &wire::simple_reply(req.cookie, code)).await
    }
}

/// The gate (FIG. 3), then the I/O on a blocking thread with the gate's guard held. The
/// guard is dropped before the reply is sent, so a slow client never delays a seal.
async fn execute(ctx: &Ctx, req: &Request, payload: Vec<u8>) -> Result<Done, (u32, String)> {
    let guard = ctx
        .gate
        .enter_async(req.cmd.writes(), ctx.hold)
        .await
        .map_err(|e| {
            let code = match e {
                GateError::Timeout(_) => errno::EIO,
                GateError::SealedReadOnly | GateError::SealedRefused => errno::EPERM,
            };
            (code, format!("disk {}: {e}", ctx.disk))
        })?;
    let backend = Arc::clone(&ctx.backend);
    let req = *req;
    let fua = req.flags & cmdflag::FUA != 0;
    let (off, len) = (req.offset, u64::from(req.len));
    let io = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        match req.cmd {
            Command::Read => {
                let mut buf = vec![0u8; 28 + req.len as usize];
                backend.read(&mut buf[28..], off).map(|()| Done::Read(buf))
            }
            Command::Write => backend.write(&payload, off, fua).map(|()| Done::Ok),
            Command::Flush => backend.flush().map(|()| Done::Ok),
            Command::Trim => backend.trim(off, len, fua).map(|()| Done::Ok),
            Command::WriteZeroes => {
                let may_trim = req.flags & cmdflag::NO_HOLE == 0;
                backend.zero(off, len, may_trim, fua).map(|()| Done::Ok)
            }
            Command::Cache => backend.cache(off, len).map(|()| Done::Ok),
            Command::BlockStatus => {
                let max = if req.flags & cmdflag::REQ_ONE != 0 {
                    1
                } else {
                    MAX_EXTENTS
                };
                backend.extents(off, len, max).map(Done::Extents)
            }
            // Checked before: DISC never runs, unknown commands were refused.
            Command::Disc | Command::Unknown(_) => Ok(Done::Ok),
        }
    })
    .await;
    match io {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => {
            tracing::warn!(disk = %ctx.disk, cmd = req.cmd.name(), error = %e, "NBD I/O failed");
            Err((
                nbd_errno(&e),
                format!("disk {}: {} failed: {e}", ctx.disk, req.cmd.name()),
            ))
        }
        Err(e) => Err((
            errno::EIO,
            format!("disk {}: I/O task failed: {e}", ctx.disk),
        )),
    }
}
