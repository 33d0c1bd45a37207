//! The transmission phase, on threads as nbdkit does it: each of a connection's worker
//! threads in turn reads a request, checks it with `wire` before any I/O, does the I/O
//! through the disk's claimed handle — which passes the disk's gate (FIG. 3: open, held
//! while blocked, refused or read-only when sealed) and holds its guard for the I/O only —
//! and writes the reply. Many requests
//! are in flight at once and replies go out as they finish, possibly out of order.
//!
//! Memory is the connection's [`Budget`]: a request's buffer is acquired from it before the
//! request is read further, sized to the request and freed after its reply (a worker keeps
//! only a small read buffer). A READ or WRITE longer than [`MAX_PAYLOAD`] (a client that
//! did not negotiate block sizes may send one up to the export's size) is streamed in
//! pieces of [`PIECE`] bytes, each through the gate.

use std::io;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::watch;

use super::backend::{nbd_errno, Backend, MAX_EXTENTS};
use super::connection::{ConnError, Inbox, StdSock};
use super::handshake::{Agreed, BASE_ALLOCATION_ID, MAX_PAYLOAD};
use super::sender::Sender;
use super::wire::{
    self, cmdflag, errno, reply, Command, Frame, Refusal, Request, OFFSET_DATA_HEADER_LEN,
    SIMPLE_REPLY_LEN,
};

/// Worker threads per connection in transmission (nbdkit's default is 16 too).
pub const WORKERS: usize = 16;
/// Budget units, and a connection's budget: bytes of request buffers it may hold at once.
const BUDGET_UNIT: u32 = 4096;
pub const BUDGET_BYTES: u32 = 64 << 20;
/// Every request costs at least this many units, which bounds the requests in flight.
const MIN_COST: u32 = 4;
/// Piece of a streamed READ or WRITE.
pub const PIECE: usize = 4 << 20;
/// A worker keeps a read buffer up to this size between requests; larger ones are freed.
const KEEP_SCRATCH: usize = 256 << 10;

/// Bytes of request buffers in flight, in units: the reader waits when they are used up
/// (back-pressure on the socket), so a connection's memory stays within `limit`.
pub struct Budget {
    state: Mutex<BudgetState>,
    freed: Condvar,
    limit: u32,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct BudgetState {
    used: u32,
    /// The reader waits for units to be freed.
    waiting: bool,
}

impl Budget {
    pub fn new(bytes: u32) -> Self {
        Self {
            state: Mutex::default(),
            freed: Condvar::new(),
            limit: bytes / BUDGET_UNIT,
        }
    }

    /// Units for a request of `len` bytes of buffer.
    fn cost(len: usize) -> u32 {
        let units = len.div_ceil(BUDGET_UNIT as usize);
        u32::try_from(units).unwrap_or(u32::MAX).max(MIN_COST)
    }

    /// Wait until `n` units fit (a request larger than the whole budget runs alone).
    fn acquire(&self, n: u32) {
        let mut s = lock(&self.state);
        while s.used.saturating_add(n) > self.limit && s.used > 0 {
            s.waiting = true;
            s = self.freed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.used += n;
    }

    fn release(&self, n: u32) {
        let mut s = lock(&self.state);
        s.used -= n;
        // A wake-up costs a system call: only when someone waits.
        if std::mem::take(&mut s.waiting) {
            self.freed.notify_all();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What every worker of a connection shares.
struct Shared {
    backend: Backend,
    /// The receiving side: the worker that holds it reads the next request, as in nbdkit
    /// (no hand-off between a reader and a worker).
    rx: Mutex<Receiver>,
    tx: Sender,
    session: wire::Session,
    disk: String,
    id: String,
    budget: Budget,
    /// WRITE payload buffers to reuse.
    spares: Spares,
}

/// WRITE payload buffers of at most [`KEEP_SCRATCH`] bytes, kept for the next WRITEs: no
/// allocation and no zeroing per small WRITE (its payload overwrites the buffer whole
/// before it is used). At most [`SPARES`] are kept; a connection's memory stays its budget
/// plus these.
#[derive(Default)]
struct Spares(Mutex<Vec<Vec<u8>>>);

/// Most payload buffers a connection keeps (8 MiB at most).
const SPARES: usize = 32;

impl Spares {
    /// A buffer of `len` bytes; its content is whatever it held before.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut b = if len <= KEEP_SCRATCH {
            lock(&self.0).pop().unwrap_or_default()
        } else {
            Vec::new()
        };
        // Shrinking keeps the capacity; growing zeroes only the new part.
        b.resize(len, 0);
        b
    }

    fn give(&self, b: Vec<u8>) {
        if b.capacity() <= KEEP_SCRATCH && b.capacity() > 0 {
            let mut s = lock(&self.0);
            if s.len() < SPARES {
                s.push(b);
            }
        }
    }
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

/// Run transmission until `NBD_CMD_DISC`, end of stream, a protocol violation or
/// `shutdown`, on threads; requests in flight finish (and are answered) before it returns.
pub async fn run(
    inbox: Inbox,
    sock: StdSock,
    agreed: Agreed,
    id: &str,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let closer = sock.try_clone()?;
    let shared = Arc::new(Shared {
        tx: Sender::new(sock.try_clone()?),
        rx: Mutex::new(Receiver {
            inbox,
            sock,
            done: None,
        }),
        session: wire::Session {
            size: agreed.backend.size(),
            structured: agreed.structured,
            meta: agreed.meta,
        },
        disk: agreed.export.name.clone(),
        id: id.to_string(),
        budget: Budget::new(BUDGET_BYTES),
        spares: Spares::default(),
        backend: agreed.backend,
    });
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            let _ = tx.send(run_blocking(&shared));
        })?;
    tokio::select! {
        r = &mut rx => return r.unwrap_or(Ok(())),
        _ = shutdown.wait_for(|s| *s) => {}
    }
    // Stop reading requests: those in flight are answered, then the workers end.
    closer.shutdown(std::net::Shutdown::Read);
    rx.await.unwrap_or(Ok(()))
}

fn run_blocking(shared: &Arc<Shared>) -> Result<(), ConnError> {
    let mut workers = Vec::with_capacity(WORKERS);
    for _ in 1..WORKERS {
        let c = Arc::clone(shared);
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
    worker(shared);
    for w in workers {
        let _ = w.join();
    }
    let mut r = lock(&shared.rx);
    r.sock.shutdown(std::net::Shutdown::Both);
    r.done.take().unwrap_or(Ok(()))
}

/// Take the next request, run it, answer it; until reading ends.
fn worker(ctx: &Shared) {
    // Small READs reuse one buffer: no allocation or zeroing per 4 KiB READ.
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
        run_job(ctx, job, &mut scratch);
    }
}

/// Read requests until one is to be run by a worker, answering refused ones (and running
/// streamed WRITEs, whose payload is on the stream) on the way. None at `NBD_CMD_DISC` or
/// end of stream.
fn next_request(r: &mut Receiver, ctx: &Shared) -> Result<Option<Job>, ConnError> {
    loop {
        let req = match wire::parse_request_header(r.inbox.data())? {
            Frame::Complete(req, n) => {
                r.inbox.consume(n);
                req
            }
            Frame::Incomplete { need } => {
                if !r.inbox.fill_sync(&mut r.sock, need)? {
                    return Ok(None);
                }
                continue;
            }
        };
        if let Err(refusal) = refuse(&req, &ctx.session) {
            tracing::debug!(conn = %ctx.id, why = %refusal.why, "request refused");
            if req.cmd == Command::Write {
                // Its payload follows: skip it, and the connection goes on.
                r.inbox.discard_sync(&mut r.sock, u64::from(req.len))?;
            }
            reply_error(ctx, &req, &refusal)?;
            continue;
        }
        match req.cmd {
            Command::Disc => return Ok(None),
            Command::Write if req.len > MAX_PAYLOAD => {
                stream_write(r, ctx, &req)?;
                continue;
            }
            _ => {}
        }
        let cost = match req.cmd {
            Command::Read if req.len > MAX_PAYLOAD => Budget::cost(PIECE),
            Command::Read | Command::Write => Budget::cost(req.len as usize),
            _ => MIN_COST,
        };
        ctx.budget.acquire(cost);
        let mut payload = Vec::new();
        if req.cmd == Command::Write {
            payload = ctx.spares.take(req.len as usize);
            if let Err(e) = r.inbox.read_exact_sync(&mut r.sock, &mut payload) {
                ctx.budget.release(cost);
                return Err(e.into());
            }
        }
        return Ok(Some(Job { req, payload, cost }));
    }
}

/// `wire::check`, and what only this server cannot do: a READ that must come in one chunk
/// (`NBD_CMD_FLAG_DF`) but is longer than one buffer (proto.md allows `EOVERFLOW`).
fn refuse(req: &Request, s: &wire::Session) -> Result<(), Refusal> {
    wire::check(req, s)?;
    if req.cmd == Command::Read && req.flags & cmdflag::DF != 0 && req.len > MAX_PAYLOAD {
        return Err(Refusal {
            errno: errno::EOVERFLOW,
            why: format!(
                "READ of {} bytes with NBD_CMD_FLAG_DF: one chunk holds at most {MAX_PAYLOAD}; clear DF or read less",
                req.len
            ),
        });
    }
    Ok(())
}

fn send(ctx: &Shared, bytes: &[u8]) -> io::Result<()> {
    ctx.tx.send(bytes)
}

fn reply_error(ctx: &Shared, req: &Request, r: &Refusal) -> io::Result<()> {
    if ctx.session.structured {
        send(ctx, &wire::error_chunk(req.cookie, r.errno, &r.why))
    } else {
        send(ctx, &wire::simple_reply(req.cookie, r.errno))
    }
}

/// Run one request and answer it; then give its budget back.
fn run_job(ctx: &Shared, mut job: Job, scratch: &mut Vec<u8>) {
    let req = job.req;
    let sent = if req.cmd == Command::Read && req.len > MAX_PAYLOAD {
        stream_read(ctx, &req)
    } else if req.cmd == Command::Read {
        buffered_read(ctx, &req, scratch)
    } else {
        match execute(ctx, &req, &mut job.payload) {
            Ok(Done::Ok) => send(ctx, &wire::simple_reply(req.cookie, 0)),
            Ok(Done::Extents(e)) => send(
                ctx,
                &wire::block_status_chunk(req.cookie, BASE_ALLOCATION_ID, &e),
            ),
            Err(r) => reply_error(ctx, &req, &r),
        }
    };
    ctx.spares.give(job.payload);
    ctx.budget.release(job.cost);
    if let Err(e) = sent {
        tracing::debug!(error = %e, "cannot send a reply; the client is gone");
    }
}

/// A READ of at most `MAX_PAYLOAD`, in one buffer with room for the reply's header before
/// the data: one write for the whole reply.
fn buffered_read(ctx: &Shared, req: &Request, scratch: &mut Vec<u8>) -> io::Result<()> {
    const H: usize = OFFSET_DATA_HEADER_LEN;
    let n = H + req.len as usize;
    let mut big = Vec::new();
    let buf: &mut [u8] = if n <= KEEP_SCRATCH {
        if scratch.len() < n {
            scratch.resize(n, 0);
        }
        &mut scratch[..n]
    } else {
        // Sized to the request and freed after it.
        big.resize(n, 0);
        &mut big[..]
    };
    if let Err(r) = execute(ctx, req, &mut buf[H..]) {
        return reply_error(ctx, req, &r);
    }
    if ctx.session.structured {
        let h = wire::offset_data_header(req.cookie, req.offset, req.len);
        buf[..H].copy_from_slice(&h);
        send(ctx, buf)
    } else {
        let at = H - SIMPLE_REPLY_LEN;
        buf[at..H].copy_from_slice(&wire::simple_reply(req.cookie, 0));
        send(ctx, &buf[at..])
    }
}

/// A READ longer than `MAX_PAYLOAD`, piece by piece, each piece through the gate. Structured
/// replies send each piece as its own `OFFSET_DATA` chunk (other replies may interleave),
/// and a failure as an error chunk; a simple reply holds the socket for the whole data,
/// and a failure after its header can only close the connection (proto.md "Simple reply
/// message"). The first piece is read before anything is sent, so its error is a reply.
fn stream_read(ctx: &Shared, req: &Request) -> io::Result<()> {
    let mut buf = vec![0u8; PIECE];
    let end = req.offset + u64::from(req.len);
    let piece = |at: u64| (end - at).min(PIECE as u64) as usize;
    let mut at = req.offset;
    if let Err(r) = read_piece(ctx, &mut buf[..piece(at)], at) {
        return reply_error(ctx, req, &r);
    }
    if ctx.session.structured {
        loop {
            let n = piece(at);
            let last = at + n as u64 == end;
            let flags = if last { reply::FLAG_DONE } else { 0 };
            let h = wire::offset_data_chunk(flags, req.cookie, at, n as u32);
            {
                let mut w = ctx.tx.exclusive()?;
                w.write_all(&h)?;
                w.write_all(&buf[..n])?;
            }
            if last {
                return Ok(());
            }
            at += n as u64;
            if let Err(r) = read_piece(ctx, &mut buf[..piece(at)], at) {
                return reply_error(ctx, req, &r);
            }
        }
    }
    let mut w = ctx.tx.exclusive()?;
    w.write_all(&wire::simple_reply(req.cookie, 0))?;
    loop {
        let n = piece(at);
        w.write_all(&buf[..n])?;
        at += n as u64;
        if at == end {
            return Ok(());
        }
        if let Err(r) = read_piece(ctx, &mut buf[..piece(at)], at) {
            tracing::warn!(conn = %ctx.id, why = %r.why, error = %ConnError::ReplyCut, "NBD connection closed");
            w.shutdown();
            return Ok(());
        }
    }
}

fn read_piece(ctx: &Shared, buf: &mut [u8], at: u64) -> Result<(), Refusal> {
    let piece = Request {
        flags: 0,
        cmd: Command::Read,
        cookie: 0,
        offset: at,
        len: buf.len() as u32,
    };
    execute(ctx, &piece, buf).map(|_| ())
}

/// A WRITE longer than `MAX_PAYLOAD`, run by the reader as its payload arrives: piece by
/// piece, each through the gate, `FUA` with the last. After a failure the rest of the
/// payload is read and discarded, and the error is the reply.
fn stream_write(r: &mut Receiver, ctx: &Shared, req: &Request) -> Result<(), ConnError> {
    let cost = Budget::cost(PIECE);
    ctx.budget.acquire(cost);
    let result = stream_write_pieces(r, ctx, req);
    ctx.budget.release(cost);
    let sent = match result? {
        Ok(()) => send(ctx, &wire::simple_reply(req.cookie, 0)),
        Err(refusal) => reply_error(ctx, req, &refusal),
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "cannot send a reply; the client is gone");
    }
    Ok(())
}

fn stream_write_pieces(
    r: &mut Receiver,
    ctx: &Shared,
    req: &Request,
) -> Result<Result<(), Refusal>, ConnError> {
    let end = req.offset + u64::from(req.len);
    let mut buf = vec![0u8; PIECE];
    let mut at = req.offset;
    let mut failed = None;
    while at < end {
        let n = (end - at).min(PIECE as u64) as usize;
        r.inbox.read_exact_sync(&mut r.sock, &mut buf[..n])?;
        if failed.is_none() {
            let last = at + n as u64 == end;
            let piece = Request {
                flags: if last { req.flags & cmdflag::FUA } else { 0 },
                cmd: Command::Write,
                cookie: req.cookie,
                offset: at,
                len: n as u32,
            };
            failed = execute(ctx, &piece, &mut buf[..n]).err();
        }
        at += n as u64;
    }
    Ok(failed.map_or(Ok(()), Err))
}

/// What a request produced.
enum Done {
    Ok,
    Extents(Vec<(u32, u32)>),
}

/// The I/O, through the disk's gate (FIG. 3: the backend's claimed handle enters it per
/// call and leaves it before the reply is sent, so a slow client never delays a seal).
/// `data` is a WRITE's payload or a READ's destination.
fn execute(ctx: &Shared, req: &Request, data: &mut [u8]) -> Result<Done, Refusal> {
    let b = &ctx.backend;
    let fua = req.flags & cmdflag::FUA != 0;
    let (off, len) = (req.offset, u64::from(req.len));
    let r = match req.cmd {
        Command::Read => b.read(data, off).map(|()| Done::Ok),
        Command::Write => b.write(data, off, fua).map(|()| Done::Ok),
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
    r.map_err(|e| {
        tracing::warn!(disk = %ctx.disk, cmd = req.cmd.name(), error = %e, "NBD I/O failed");
        Refusal {
            errno: nbd_errno(&e),
            why: format!("disk {}: {} failed: {e}", ctx.disk, req.cmd.name()),
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn budget_holds_the_reader_until_units_are_freed() {
        let b = Arc::new(Budget::new(BUDGET_BYTES));
        let all = b.limit;
        b.acquire(all - 1);
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
        b.release(all - 1);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the release did not wake the waiting reader");
        // A request larger than the whole budget still runs when nothing else is in flight.
        b.release(2);
        b.acquire(all + 5);
        b.release(all + 5);
        assert_eq!(*lock(&b.state), BudgetState::default());
        // A streamed request costs one piece, however long it is.
        assert_eq!(Budget::cost(PIECE), (PIECE / 4096) as u32);
        assert_eq!(Budget::cost(1), MIN_COST);
    }
}
