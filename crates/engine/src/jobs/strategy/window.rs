//! [`Window`]: the four passes with large sequential I/O only, the same images as
//! [`Direct`](super::Direct).
//!
//! # Thin-disk layout
//!
//! The slots `[0, M)` are cut into windows of `K` consecutive slots ([`Layout`]); window `w`
//! holds slots `[w*K, (w+1)*K)` and owns the same bytes of the thin disk as under `direct`,
//! `[w*K*S, (w+1)*K*S)` (its *region*). Inside its region a window stores the sectors whose
//! slot falls in it **packed at the start, in ascending sector index `i`**: the `r`-th
//! smallest such `i` is at `w*K*S + r*S`. The rest of the region is never written (a hole).
//! `K` depends only on `M` and `S`, which the record holds, so every pass of every later
//! process finds the same layout; the memory budget changes buffer sizes, never `K`.
//!
//! Why this order: a scatter reading the image in order `i` appends to each window's
//! region sequentially (one large write per window buffer), a plain gather is a k-way merge
//! of the windows' regions (each read sequentially), and in the sealed image (slots in
//! ascending order, empty ones skipped) window `w` is one contiguous run, so a sealed pass
//! moves one window at a time, reordering it in memory.
//!
//! # Memory
//!
//! [`PassCtx::memory_bytes`] (`--memory`, default 256 MiB) bounds what a pass holds, however
//! large the disk (see [`Budget`]):
//! - a plain pass: one buffer of up to 256 KiB per window, a few MiB in flight, 1 MiB chunks;
//! - a sealed pass: a window's source (up to a quarter of the budget, twice for read-ahead)
//!   and a few 256 KiB writes in flight; a window larger than a quarter of the budget is
//!   moved in slices, reading its source once per slice (at most 64 slices);
//! - a map of `pi` (4 bytes a sector, 8 while it is regrouped) carried from a job's first
//!   pass to its second, only when it fits in half the budget ([`SlotMap`]).
//!
//! Below a floor of one sector per buffer the budget is exceeded rather than the I/O made
//! absurdly small.
//!
//! # Threads and I/O
//!
//! Each pass runs a reader thread, the calling thread (placement, cipher, reordering) and a
//! writer thread, and a sealed pass a planner thread, joined by bounded channels inside
//! [`std::thread::scope`]; the BLAKE3 digest is computed by whichever helper sees the bytes
//! in image order. Buffers are small and recycled so that the bytes the kernel copies are
//! still in the CPU cache. Windows fill at about the same rate, so their first flushes (and
//! a plain gather's first read-aheads) are staggered to spread the I/O out.
//!
//! A pass adds no fsync: the job fsyncs the thin disk after a scatter and the image after a
//! gather. The writer asks the kernel to start writing back each range it wrote
//! ([`Disk::release`]), and a gather drops the thin disk's pages it has read: the device is
//! kept busy during the pass instead of at the final fsync, and little page cache is left
//! for the thin disk's deletion.

use std::mem;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::Instant;

use pdguard_core::digest::ImageHasher;
use pdguard_core::Geometry;

use super::{PassCtx, Strategy};
use crate::store::{Disk, Result, StoreError};

/// Windows aim at regions of about `sqrt(M * S * REGION_FACTOR)` bytes: 23 MiB for a 4 GiB
/// thin disk, 91 MiB for 64 GiB, 362 MiB for 1 TiB. It balances the two kinds of pass: a
/// sealed pass holds one region in memory, a plain pass one buffer per window.
const REGION_FACTOR: u128 = 1 << 17;
/// Small disks still get this many windows (when they have that many slots).
const MIN_WINDOWS: u64 = 8;
/// Largest window, in slots: reorderings index a window with `u32`.
const MAX_WINDOW_SLOTS: u64 = 1 << 31;
/// Largest sequential I/O on the image side of a plain pass.
const MAX_CHUNK: u64 = 1 << 20;
/// Largest buffer of one window in a plain pass. Small on purpose: the kernel copies a
/// buffer still in the CPU cache into the page cache several times faster than a cold one,
/// and 256 KiB writes are already large for a file system.
const MAX_WINDOW_BUF: u64 = 256 << 10;
/// Chunks of the image in flight between the main thread and its reader or writer.
const CHUNKS: usize = 3;
/// Window buffers in flight to the writer of a plain scatter, beyond one per window: at least
/// this many, and up to [`IN_FLIGHT_BYTES`] of them, so that the writer's hiccups do not stall
/// the calling thread.
const IN_FLIGHT: usize = 4;
const IN_FLIGHT_BYTES: u64 = 8 << 20;
/// Bytes per write of a sealed pass: small, so that the writer copies them to the page cache
/// while they are still in the CPU cache (large cold buffers make the kernel's copy several
/// times slower).
const WRITE_CHUNK: usize = 256 << 10;
/// Bytes of consecutive writes released to writeback at once (see [`WriteBehind`]).
const RELEASE_BYTES: u64 = 4 << 20;
/// Ranges smaller than this are not released on their own (see [`WriteBehind`]).
const MIN_RELEASE_BYTES: u64 = 64 << 10;
/// Write buffers of a sealed pass.
const OUT_BUFS: usize = 4;
/// Slots whose sectors a planner asks the placement for at once.
const PLAN_BATCH: u64 = 4096;
/// A window is moved in at most this many slices, however small the budget.
const MAX_SLICES: u64 = 64;

/// The `window` strategy: see the module documentation.
#[derive(Default)]
pub struct Window {
    /// `pi` as one pass of this job computed it, for the next pass of the same job.
    map: Mutex<Option<SlotMap>>,
}

/// `slots[i] = pi(i)`, kept from a seal's scatter for its gather and from an unseal's
/// scatter for its gather, so that an expensive placement (Feistel: about 200 ns a sector)
/// is evaluated once per job rather than once per pass. Kept only while it fits the memory
/// budget (with its regrouping, `8 N` bytes in half the budget) and `M < 2^32`.
struct SlotMap {
    key: MapKey,
    slots: Vec<u32>,
}

/// What a map was computed for: the geometry, the placement object and three of its values
/// (so that a map is never used with another placement, even one at the same address).
#[derive(Debug, PartialEq, Eq)]
struct MapKey {
    geometry: Geometry,
    placement: usize,
    probe: [u64; 3],
}

impl MapKey {
    fn of(ctx: &PassCtx) -> Self {
        let (p, n) = (ctx.placement, ctx.geometry.sectors());
        Self {
            geometry: ctx.geometry,
            placement: std::ptr::from_ref(p).cast::<()>() as usize,
            probe: [p.slot_of(0), p.slot_of(n / 2), p.slot_of(n - 1)],
        }
    }
}

impl Window {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<SlotMap>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The map a previous pass of this job left, if it was for this placement; any map is
    /// dropped either way.
    fn take_map(&self, ctx: &PassCtx) -> Option<Vec<u32>> {
        let m = self.lock().take()?;
        (m.key == MapKey::of(ctx)).then_some(m.slots)
    }

    fn keep_map(&self, ctx: &PassCtx, slots: Vec<u32>) {
        *self.lock() = Some(SlotMap {
            key: MapKey::of(ctx),
            slots,
        });
    }

    /// Whether a pass should build a [`SlotMap`] for the next one.
    fn may_map(ctx: &PassCtx) -> bool {
        let g = ctx.geometry;
        g.thin_sectors() <= u64::from(u32::MAX)
            && g.sectors().saturating_mul(8) <= ctx.memory_bytes / 2
    }
}

/// The thin-disk layout of the `window` strategy: windows of `K` slots. A pure function of the
/// record's slot count `M` and sector size `S`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    slots: u64,
    sector: u64,
    window: u64,
}

impl Layout {
    /// `K = max(1, min(floor(isqrt(M * S * 2^17) / S), ceil(M / 8), 2^31))`.
    pub fn new(g: &Geometry) -> Self {
        let slots = g.thin_sectors();
        let sector = u64::from(g.sector_size());
        let target = isqrt(u128::from(slots) * u128::from(sector) * REGION_FACTOR);
        let by_size = u64::try_from(target / u128::from(sector)).unwrap_or(u64::MAX);
        let most = slots.div_ceil(MIN_WINDOWS).clamp(1, MAX_WINDOW_SLOTS);
        let window = by_size.clamp(1, most);
        Self {
            slots,
            sector,
            window,
        }
    }

    /// `K`: slots per window (the last window may have fewer).
    pub fn window_slots(&self) -> u64 {
        self.window
    }

    /// `W = ceil(M / K)`: number of windows.
    pub fn windows(&self) -> u64 {
        self.slots.div_ceil(self.window)
    }

    /// The window that holds `slot`.
    pub fn window_of(&self, slot: u64) -> usize {
        (slot / self.window) as usize
    }

    fn first_slot(&self, w: usize) -> u64 {
        w as u64 * self.window
    }

    /// Slots in window `w`.
    fn capacity(&self, w: usize) -> u64 {
        self.window.min(self.slots - self.first_slot(w))
    }

    /// Byte offset on the thin disk of the `r`-th packed sector of window `w`.
    pub fn packed_offset(&self, w: usize, r: u64) -> u64 {
        (self.first_slot(w) + r) * self.sector
    }
}

/// `floor(sqrt(n))`, exact.
fn isqrt(n: u128) -> u128 {
    let mut x = (n as f64).sqrt() as u128;
    while x * x > n {
        x -= 1;
    }
    while (x + 1) * (x + 1) <= n {
        x += 1;
    }
    x
}

/// How a pass spends its memory budget. Never changes where bytes go.
#[derive(Debug, Clone, Copy)]
struct Budget {
    /// Bytes per sequential image-side I/O of a plain pass.
    chunk: usize,
    /// Bytes of one window's buffer in a plain scatter; a plain gather reads each window
    /// ahead in two halves of it.
    window_buf: usize,
    /// Window buffers in flight to the writer of a plain scatter.
    in_flight: usize,
    /// Sectors per piece (read) and slice (written) of a sealed pass.
    slice: u64,
}

impl Budget {
    fn new(memory: u64, lay: &Layout) -> Self {
        let s = lay.sector;
        let sectors = |b: u64| (b / s).max(1);
        let chunk = sectors(MAX_CHUNK.min(memory / 16));
        let rest = memory.saturating_sub(CHUNKS as u64 * chunk * s);
        let per_window = rest / (lay.windows() + IN_FLIGHT as u64);
        let window_buf = sectors(MAX_WINDOW_BUF.min(per_window));
        let spare_bufs = (rest / (window_buf * s)).saturating_sub(lay.windows());
        let in_flight = (IN_FLIGHT_BYTES / (window_buf * s))
            .min(spare_bufs)
            .max(IN_FLIGHT as u64);
        let slice = sectors(memory / 4)
            .max(lay.window.div_ceil(MAX_SLICES))
            .min(lay.window);
        Self {
            chunk: (chunk * s) as usize,
            window_buf: (window_buf * s) as usize,
            in_flight: in_flight as usize,
            slice,
        }
    }
}

/// Why the calling thread of a pass stopped before the end.
enum Stop {
    /// Its own I/O failed.
    Io(StoreError),
    /// A helper thread quit; the helper's own result says why.
    Peer,
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Self::Io(e)
    }
}

type Step<T = ()> = std::result::Result<T, Stop>;

fn internal(why: &str) -> StoreError {
    StoreError::io(
        "move",
        "sectors with the window strategy",
        std::io::Error::other(format!("internal error: {why}")),
    )
}

/// Start a helper thread named `name` (seen in `top -H` and `perf`).
fn spawn<'s, T: Send + 's>(
    sc: &'s Scope<'s, '_>,
    name: &str,
    f: impl FnOnce() -> T + Send + 's,
) -> ScopedJoinHandle<'s, T> {
    thread::Builder::new()
        .name(name.into())
        .spawn_scoped(sc, f)
        .unwrap_or_else(|e| panic!("cannot start a thread: {e}"))
}

/// A helper's result; a panic in it is a panic of the pass.
fn joined<T>(h: ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    match h.join() {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// The calling thread's own error first (a helper may have failed only because it left);
/// else the first helper's error; else success.
fn settle<const K: usize>(main: Step, helpers: [Result<()>; K]) -> Result<()> {
    match main {
        Err(Stop::Io(e)) => Err(e),
        other => {
            for h in helpers {
                h?;
            }
            match other {
                Ok(()) => Ok(()),
                Err(_) => Err(internal("a helper thread stopped early without an error")),
            }
        }
    }
}

/// A buffer of `cap` bytes: a returned one, a new one while fewer than `limit` exist, or the
/// next one returned.
fn spare(pool: &Receiver<Vec<u8>>, made: &mut usize, limit: usize, cap: usize) -> Step<Vec<u8>> {
    if let Ok(b) = pool.try_recv() {
        return Ok(b);
    }
    if *made < limit {
        *made += 1;
        return Ok(Vec::with_capacity(cap));
    }
    pool.recv().map_err(|_| Stop::Peer)
}

/// A piece of a disk read in order: bytes, or a hole (zeros that were not read).
enum Chunk {
    Data(Vec<u8>),
    Zeros(u64),
}

impl Chunk {
    fn len(&self) -> u64 {
        match self {
            Self::Data(b) => b.len() as u64,
            Self::Zeros(n) => *n,
        }
    }
}

/// Reads `disk` bytes `[0, len)` in order in `chunk`-byte pieces, into at most `depth`
/// buffers that the consumer sends back; a piece that is all hole in the disk's
/// [data map](Disk::data_map) is sent as [`Chunk::Zeros`] without being read. Hashes what
/// it reads if given a hasher.
#[allow(clippy::too_many_arguments)]
fn read_sequential(
    disk: &dyn Disk,
    len: u64,
    chunk: usize,
    depth: usize,
    back: Receiver<Vec<u8>>,
    out: SyncSender<Chunk>,
    mut hasher: Option<ImageHasher>,
) -> Result<Option<blake3::Hash>> {
    let map = disk.data_map()?;
    let mut made = 0;
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk as u64) as usize;
        let piece = if map.is_hole(off, n as u64) {
            if let Some(h) = hasher.as_mut() {
                h.update_zeros(n as u64);
            }
            Chunk::Zeros(n as u64)
        } else {
            let Ok(mut buf) = spare(&back, &mut made, depth, chunk) else {
                return Ok(None); // the consumer left; it says why
            };
            buf.resize(n, 0);
            disk.read_at(&mut buf, off)?;
            if let Some(h) = hasher.as_mut() {
                h.update(&buf);
            }
            Chunk::Data(buf)
        };
        if out.send(piece).is_err() {
            return Ok(None);
        }
        off += n as u64;
    }
    Ok(hasher.map(|h| h.finalize()))
}

/// What a writer thread writes.
enum Out {
    /// Bytes at an offset.
    Bytes(u64, Vec<u8>),
    /// Runs at their offsets, in order: bytes of the buffer, or zeros (skipped where the
    /// destination is a hole, see [`Disk::write_zeros`]). One message for many small runs.
    Runs(Vec<u8>, Vec<(u64, Run)>),
}

enum Run {
    Bytes(std::ops::Range<usize>),
    Zeros(u64),
}

/// Writes what it receives, in order, and sends byte buffers back (still holding their
/// bytes: a consumer that overwrites one whole need not clear or zero it); hashes what it
/// writes if given a hasher.
fn write_jobs(
    disk: &dyn Disk,
    jobs: Receiver<Out>,
    back: Sender<Vec<u8>>,
    mut hasher: Option<ImageHasher>,
) -> Result<Option<blake3::Hash>> {
    let mut behind = WriteBehind::default();
    let put = |bytes: &[u8], off: u64, behind: &mut WriteBehind| -> Result<()> {
        disk.write_at(bytes, off)?;
        behind.wrote(disk, off, bytes.len() as u64);
        Ok(())
    };
    for out in jobs {
        let buf = match out {
            Out::Bytes(off, buf) => {
                if let Some(h) = hasher.as_mut() {
                    h.update(&buf);
                }
                put(&buf, off, &mut behind)?;
                buf
            }
            Out::Runs(buf, runs) => {
                for (off, run) in runs {
                    match run {
                        Run::Bytes(r) => {
                            if let Some(h) = hasher.as_mut() {
                                h.update(&buf[r.clone()]);
                            }
                            put(&buf[r], off, &mut behind)?;
                        }
                        Run::Zeros(len) => {
                            if let Some(h) = hasher.as_mut() {
                                h.update_zeros(len);
                            }
                            disk.write_zeros(off, len)?;
                        }
                    }
                }
                buf
            }
        };
        let _ = back.send(buf);
    }
    behind.flush(disk);
    Ok(hasher.map(|h| h.finalize()))
}

/// The range written last and not yet [released](Disk::release): a write that continues it
/// extends it up to [`RELEASE_BYTES`]; any other write releases it first. Sequential writes
/// go to writeback in a few large requests, interleaved ones (a plain scatter's windows)
/// one buffer at a time, which is what measured fastest for each.
#[derive(Default)]
struct WriteBehind {
    pending: Option<(u64, u64)>,
}

impl WriteBehind {
    fn wrote(&mut self, disk: &dyn Disk, off: u64, len: u64) {
        let start = match self.pending.take() {
            Some((start, end)) if end == off => start,
            Some((start, end)) => {
                // A small range on its own (a sealed sparse image's scattered pages) is left
                // to the final fsync, which writes such pages back sorted and merged; one
                // writeback request per page costs more than the whole write.
                if end - start >= MIN_RELEASE_BYTES {
                    disk.release(start, end - start);
                }
                off
            }
            None => off,
        };
        let end = off + len;
        if end - start >= RELEASE_BYTES {
            disk.release(start, end - start);
        } else {
            self.pending = Some((start, end));
        }
    }

    fn flush(self, disk: &dyn Disk) {
        if let Some((start, end)) = self.pending {
            if end - start >= MIN_RELEASE_BYTES {
                disk.release(start, end - start);
            }
        }
    }
}

fn log_pass(pass: &'static str, ctx: &PassCtx, lay: &Layout, b: &Budget, t0: Instant) {
    let secs = t0.elapsed().as_secs_f64();
    let mib = ctx.geometry.disk_bytes() as f64 / f64::from(1 << 20);
    tracing::info!(
        pass,
        strategy = "window",
        windows = lay.windows(),
        window_slots = lay.window,
        chunk = b.chunk,
        window_buf = b.window_buf,
        slice_sectors = b.slice,
        seconds = format_args!("{secs:.3}"),
        mib_per_s = format_args!("{:.0}", mib / secs.max(1e-9)),
        "pass done"
    );
}

impl Strategy for Window {
    fn name(&self) -> &'static str {
        "window"
    }

    /// `thin[pi(i)] = E(image[i])`: the image is read in order; each sector is appended to
    /// its window's buffer, and a full buffer is one write at the window's next packed place.
    fn scatter_plain(
        &self,
        ctx: &PassCtx,
        image: &dyn Disk,
        thin: &dyn Disk,
    ) -> Result<blake3::Hash> {
        let t0 = Instant::now();
        let lay = Layout::new(&ctx.geometry);
        let b = Budget::new(ctx.memory_bytes, &lay);
        let len = ctx.geometry.disk_bytes();
        let mut digest = None;
        drop(self.take_map(ctx));
        let mut map =
            Self::may_map(ctx).then(|| Vec::with_capacity(ctx.geometry.sectors() as usize));
        thread::scope(|sc| {
            let (full_tx, full_rx) = sync_channel(CHUNKS);
            let (back_tx, back_rx) = channel();
            let hasher = Some(ctx.plain_hasher());
            let reader = spawn(sc, "pdguard-read", move || {
                read_sequential(image, len, b.chunk, CHUNKS, back_rx, full_tx, hasher)
            });
            let (job_tx, job_rx) = sync_channel(b.in_flight);
            let (spare_tx, spare_rx) = channel();
            let writer = spawn(sc, "pdguard-write", move || {
                write_jobs(thin, job_rx, spare_tx, None)
            });
            let main = scatter_main(
                ctx,
                &lay,
                &b,
                full_rx,
                back_tx,
                job_tx,
                spare_rx,
                map.as_mut(),
            );
            let read = joined(reader).map(|h| digest = h);
            settle(main, [read, joined(writer).map(drop)])
        })?;
        if let Some(map) = map {
            self.keep_map(ctx, map);
        }
        log_pass("scatter plain", ctx, &lay, &b, t0);
        digest.ok_or_else(|| internal("no digest from the reader"))
    }

    /// `image[j] = thin[u_j]`: window by window, its packed sectors are read, put in slot
    /// order and written as one run of the sealed image.
    fn gather_sealed(
        &self,
        ctx: &PassCtx,
        thin: &dyn Disk,
        image: &dyn Disk,
    ) -> Result<blake3::Hash> {
        self.sealed_pass(ctx, Dir::Gather, thin, image)
    }

    /// `thin[u_j] = image[j]`: window by window, its run of the sealed image is read, put in
    /// sector order and written packed.
    fn scatter_sealed(
        &self,
        ctx: &PassCtx,
        image: &dyn Disk,
        thin: &dyn Disk,
    ) -> Result<blake3::Hash> {
        self.sealed_pass(ctx, Dir::Scatter, image, thin)
    }

    /// `image[i] = D(thin[pi(i)])`: a merge of the windows' packed streams (each in
    /// ascending `i`), read ahead sequentially, the image written in order.
    fn gather_plain(
        &self,
        ctx: &PassCtx,
        thin: &dyn Disk,
        image: &dyn Disk,
    ) -> Result<blake3::Hash> {
        let t0 = Instant::now();
        let lay = Layout::new(&ctx.geometry);
        let b = Budget::new(ctx.memory_bytes, &lay);
        let mut digest = None;
        thread::scope(|sc| {
            let (req_tx, req_rx) = channel::<(usize, u64, Vec<u8>)>();
            let (resp_tx, resp_rx) = channel();
            let reader = spawn(sc, "pdguard-read", move || {
                // Holes of the thin disk are not read: their sectors are zeros.
                let map = thin.data_map()?;
                let s = lay.sector;
                for (w, off, mut buf) in req_rx {
                    let n = buf.len() as u64 / s;
                    let ranges = data_sectors(&map, off, n, s);
                    for &(a, b) in &ranges {
                        thin.read_at(&mut buf[(a * s) as usize..(b * s) as usize], off + a * s)?;
                    }
                    thin.release(off, buf.len() as u64);
                    if resp_tx.send((w, (buf, presence(&ranges, n)))).is_err() {
                        break;
                    }
                }
                Ok(())
            });
            let (job_tx, job_rx) = sync_channel(CHUNKS - 1);
            let (spare_tx, spare_rx) = channel();
            let hasher = Some(ctx.plain_hasher());
            let writer = spawn(sc, "pdguard-write", move || {
                write_jobs(image, job_rx, spare_tx, hasher)
            });
            let streams = Streams::new(&lay, &b, req_tx, resp_rx);
            let map = self.take_map(ctx);
            let main = gather_main(ctx, &lay, &b, streams, job_tx, spare_rx, map.as_deref());
            let read = joined(reader);
            let wrote = joined(writer).map(|h| digest = h);
            settle(main, [read, wrote])
        })?;
        log_pass("gather plain", ctx, &lay, &b, t0);
        digest.ok_or_else(|| internal("no digest from the writer"))
    }
}

/// The window buffers of a plain scatter: each holds the next packed sectors of its window,
/// from packed rank `sent[w]` on.
struct Buckets<'a> {
    lay: &'a Layout,
    b: &'a Budget,
    bufs: Vec<Vec<u8>>,
    /// Fill level at which a window's buffer is sent (staggered for the first send).
    limit: Vec<usize>,
    /// Packed sectors of each window already sent to the writer, or skipped as zeros.
    sent: Vec<u64>,
    made: usize,
    jobs: SyncSender<Out>,
    pool: Receiver<Vec<u8>>,
}

impl<'a> Buckets<'a> {
    fn new(lay: &'a Layout, b: &'a Budget, jobs: SyncSender<Out>, pool: Receiver<Vec<u8>>) -> Self {
        let s = lay.sector as usize;
        let windows = lay.windows() as usize;
        // Windows fill at about the same rate: with equal buffers they would all be full
        // at once, the writer busy while this thread waits, then idle while it fills them
        // again. Staggered first sends (window w after (w+1)/W of a buffer) spread the
        // writes out.
        let per_buf = b.window_buf / s;
        Self {
            lay,
            b,
            bufs: vec![Vec::new(); windows],
            limit: (0..windows)
                .map(|w| (per_buf * (w + 1) / windows).max(1) * s)
                .collect(),
            sent: vec![0; windows],
            made: 0,
            jobs,
            pool,
        }
    }

    /// Append `E(sector)` to window `w`'s buffer; send the buffer when full.
    fn push(&mut self, ctx: &PassCtx, w: usize, slot: u64, sector: &[u8]) -> Step {
        let buf = &mut self.bufs[w];
        if buf.capacity() == 0 {
            buf.reserve_exact(self.b.window_buf);
        }
        let at = buf.len();
        buf.extend_from_slice(sector);
        ctx.encrypt(slot, &mut buf[at..]);
        if buf.len() >= self.limit[w] {
            self.limit[w] = self.b.window_buf;
            self.send(w)?;
        }
        Ok(())
    }

    /// A sector of zeros that stays zeros goes to window `w`: its packed place is a hole of
    /// the new thin disk already, so it is skipped rather than written.
    fn skip(&mut self, w: usize) -> Step {
        if !self.bufs[w].is_empty() {
            self.send(w)?;
        }
        self.sent[w] += 1;
        Ok(())
    }

    fn send(&mut self, w: usize) -> Step {
        let mut fresh = spare(
            &self.pool,
            &mut self.made,
            self.b.in_flight,
            self.b.window_buf,
        )?;
        fresh.clear();
        let full = mem::replace(&mut self.bufs[w], fresh);
        let off = self.lay.packed_offset(w, self.sent[w]);
        self.sent[w] += (full.len() / self.lay.sector as usize) as u64;
        self.jobs
            .send(Out::Bytes(off, full))
            .map_err(|_| Stop::Peer)
    }

    fn finish(mut self) -> Step {
        for w in 0..self.bufs.len() {
            if !self.bufs[w].is_empty() {
                self.send(w)?;
            }
        }
        Ok(())
    }
}

/// The calling thread of a plain scatter.
#[allow(clippy::too_many_arguments)]
fn scatter_main(
    ctx: &PassCtx,
    lay: &Layout,
    b: &Budget,
    full: Receiver<Chunk>,
    back: Sender<Vec<u8>>,
    jobs: SyncSender<Out>,
    pool: Receiver<Vec<u8>>,
    mut map: Option<&mut Vec<u32>>,
) -> Step {
    let s = lay.sector as usize;
    let mut buckets = Buckets::new(lay, b, jobs, pool);
    // Zeros stay zeros unless the secure profile encrypts them.
    let zeros_stay = ctx.cipher.is_none() || ctx.keep_holes;
    let zero = vec![0u8; s];
    let mut slots = Vec::new();
    let mut i = 0u64;
    for chunk in full.iter() {
        let n = (chunk.len() / s as u64) as usize;
        slots.resize(n, 0);
        ctx.placement.slots_of(i, &mut slots);
        if let Some(m) = map.as_mut() {
            m.extend(slots.iter().map(|&t| t as u32));
        }
        match &chunk {
            Chunk::Data(bytes) => {
                for (sector, &slot) in bytes.chunks_exact(s).zip(&slots) {
                    buckets.push(ctx, lay.window_of(slot), slot, sector)?;
                }
            }
            Chunk::Zeros(_) if zeros_stay => {
                for &slot in &slots {
                    buckets.skip(lay.window_of(slot))?;
                }
            }
            Chunk::Zeros(_) => {
                for &slot in &slots {
                    buckets.push(ctx, lay.window_of(slot), slot, &zero)?;
                }
            }
        }
        ctx.progress.advance(chunk.len());
        i += n as u64;
        if let Chunk::Data(bytes) = chunk {
            let _ = back.send(bytes);
        }
    }
    if i != ctx.geometry.sectors() {
        return Err(Stop::Peer);
    }
    buckets.finish()
}

/// The packed sectors of every window as streams in ascending `i`, each read ahead in two
/// halves of a window buffer by the reader thread.
struct Streams {
    lay: Layout,
    s: usize,
    half: u64,
    cur: Vec<Vec<u8>>,
    /// Which sectors of `cur` were read (see [`Piece::present`]); `None`: all.
    cur_present: Vec<Option<Vec<u64>>>,
    pos: Vec<usize>,
    /// Packed sectors requested so far, per window.
    asked: Vec<u64>,
    pending: Vec<bool>,
    ready: Vec<Option<Part>>,
    req: Sender<(usize, u64, Vec<u8>)>,
    resp: Receiver<(usize, Part)>,
}

/// Bytes read for a stream, and which of their sectors were read (the others are holes).
type Part = (Vec<u8>, Option<Vec<u64>>);

impl Streams {
    fn new(
        lay: &Layout,
        b: &Budget,
        req: Sender<(usize, u64, Vec<u8>)>,
        resp: Receiver<(usize, Part)>,
    ) -> Self {
        let w = lay.windows() as usize;
        Self {
            lay: *lay,
            s: lay.sector as usize,
            half: (b.window_buf as u64 / 2 / lay.sector).max(1),
            cur: vec![Vec::new(); w],
            cur_present: vec![None; w],
            pos: vec![0; w],
            asked: vec![0; w],
            pending: vec![false; w],
            ready: vec![None; w],
            req,
            resp,
        }
    }

    /// Ask the reader for the next part of window `w`'s region, into `buf`.
    fn request(&mut self, w: usize, mut buf: Vec<u8>) -> Step {
        let mut n = self.half;
        if self.asked[w] == 0 {
            // Staggered like the scatter's buffers, so that the windows do not all run dry
            // at once.
            let windows = self.cur.len() as u64;
            n = (n * (w as u64 + 1) / windows).max(1);
        }
        let n = n.min(self.lay.capacity(w) - self.asked[w]);
        if n == 0 {
            return Ok(());
        }
        buf.resize(n as usize * self.s, 0);
        let off = self.lay.packed_offset(w, self.asked[w]);
        self.asked[w] += n;
        self.pending[w] = true;
        self.req.send((w, off, buf)).map_err(|_| Stop::Peer)
    }

    fn start(&mut self) -> Step {
        for w in 0..self.cur.len() {
            self.request(w, Vec::new())?;
        }
        Ok(())
    }

    /// The next sector of window `w`; `None` for a sector of zeros in a hole of the thin disk.
    fn next(&mut self, w: usize) -> Step<Option<&[u8]>> {
        if self.pos[w] == self.cur[w].len() {
            self.refill(w)?;
        }
        let at = self.pos[w];
        self.pos[w] += self.s;
        let k = at / self.s;
        let read = match &self.cur_present[w] {
            Some(m) => m[k / 64] >> (k % 64) & 1 == 1,
            None => true,
        };
        Ok(read.then(|| &self.cur[w][at..at + self.s]))
    }

    fn refill(&mut self, w: usize) -> Step {
        if !self.pending[w] && self.ready[w].is_none() {
            return Err(Stop::Io(internal("a window's stream ended early")));
        }
        let (fresh, present) = loop {
            if let Some(b) = self.ready[w].take() {
                break b;
            }
            let (v, part) = self.resp.recv().map_err(|_| Stop::Peer)?;
            self.pending[v] = false;
            self.ready[v] = Some(part);
        };
        let old = mem::replace(&mut self.cur[w], fresh);
        self.cur_present[w] = present;
        self.pos[w] = 0;
        self.request(w, old)
    }
}

/// The calling thread of a plain gather.
fn gather_main(
    ctx: &PassCtx,
    lay: &Layout,
    b: &Budget,
    mut streams: Streams,
    jobs: SyncSender<Out>,
    pool: Receiver<Vec<u8>>,
    map: Option<&[u32]>,
) -> Step {
    let s = lay.sector as usize;
    let n_total = ctx.geometry.sectors();
    let per_chunk = (b.chunk / s) as u64;
    let unit = (4096 / lay.sector).max(1);
    let zeros_stay = ctx.cipher.is_none() || ctx.keep_holes;
    let zero = vec![0u8; s];
    streams.start()?;
    let mut made = 0;
    let mut slots = Vec::new();
    let mut i = 0u64;
    while i < n_total {
        let n = per_chunk.min(n_total - i);
        slots.resize(n as usize, 0);
        match map {
            Some(m) => {
                let part = &m[i as usize..(i + n) as usize];
                for (t, &m) in slots.iter_mut().zip(part) {
                    *t = u64::from(m);
                }
            }
            None => ctx.placement.slots_of(i, &mut slots),
        }
        let mut out = spare(&pool, &mut made, CHUNKS, b.chunk)?;
        out.clear();
        // Page by page of the image (4 KiB, at least a sector): a page of zeros from holes
        // of the thin disk joins a run of zeros, a page with data is copied whole.
        let mut runs: Vec<(u64, Run)> = Vec::new();
        let mut k = 0;
        while k < n {
            let end = (((i + k) / unit + 1) * unit - i).min(n);
            let at = out.len();
            let mut any = false;
            for (j, &slot) in (k..end).zip(&slots[k as usize..end as usize]) {
                let sector = match streams.next(lay.window_of(slot))? {
                    Some(bytes) => bytes,
                    // Zeros from a hole decrypt to zeros only when zeros stay zeros.
                    None if zeros_stay => {
                        if any {
                            out.extend_from_slice(&zero);
                        }
                        continue;
                    }
                    None => &zero,
                };
                if !any {
                    out.resize(at + (j - k) as usize * s, 0);
                    any = true;
                }
                let from = out.len();
                out.extend_from_slice(sector);
                ctx.decrypt(slot, &mut out[from..]);
            }
            let off = ctx.geometry.offset(i + k);
            if any {
                match runs.last_mut() {
                    Some((_, Run::Bytes(r))) => r.end = out.len(),
                    _ => runs.push((off, Run::Bytes(at..out.len()))),
                }
            } else {
                let len = (end - k) * lay.sector;
                match runs.last_mut() {
                    Some((_, Run::Zeros(z))) => *z += len,
                    _ => runs.push((off, Run::Zeros(len))),
                }
            }
            k = end;
        }
        ctx.progress.advance(n * lay.sector);
        jobs.send(Out::Runs(out, runs)).map_err(|_| Stop::Peer)?;
        i += n;
    }
    Ok(())
}

/// Which sealed pass: gather (packed region to sealed run) or scatter (the inverse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Gather,
    Scatter,
}

/// One window of a sealed pass: its run starts at sealed sector `start` and holds `count`
/// sectors; destination sector `t` of the window (run position when gathering, packed rank
/// when scattering) is source sector `from[t]`.
struct Plan {
    w: usize,
    start: u64,
    count: u64,
    from: Vec<u32>,
}

/// A piece of a window's source, read for one slice of its destination.
struct Piece {
    plan: Arc<Plan>,
    slice: u64,
    piece: u64,
    buf: Vec<u8>,
    /// Which of the piece's sectors were read, one bit each; `None`: all of them. A sector
    /// not read lies in a hole of the source, so it is zeros, and its bytes in `buf` are
    /// stale.
    present: Option<Vec<u64>>,
}

impl Piece {
    fn has(&self, k: u64) -> bool {
        match &self.present {
            Some(m) => m[(k / 64) as usize] >> (k % 64) & 1 == 1,
            None => true,
        }
    }
}

/// The bitmap of `n` sectors set in `ranges` (from [`data_sectors`]), `None` when all are.
fn presence(ranges: &[(u64, u64)], n: u64) -> Option<Vec<u64>> {
    if let [(0, b)] = ranges {
        if *b == n {
            return None;
        }
    }
    let mut m = vec![0u64; n.div_ceil(64) as usize];
    for &(a, b) in ranges {
        for k in a..b {
            m[(k / 64) as usize] |= 1 << (k % 64);
        }
    }
    Some(m)
}

/// The sectors of `[off, off + n * s)` that touch a data range of `map`, as merged sector
/// ranges relative to `off`.
fn data_sectors(map: &crate::store::DataMap, off: u64, n: u64, s: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = Vec::new();
    for (r, data) in map.pieces(off, n * s) {
        if !data {
            continue;
        }
        let (a, b) = ((r.start - off) / s, (r.end - off).div_ceil(s));
        match v.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => v.push((a, b)),
        }
    }
    v
}

impl Plan {
    /// Byte offset of the source's `k`-th sector (packed rank or run position).
    fn src(&self, lay: &Layout, dir: Dir, k: u64) -> u64 {
        match dir {
            Dir::Gather => lay.packed_offset(self.w, k),
            Dir::Scatter => (self.start + k) * lay.sector,
        }
    }

    fn dst(&self, lay: &Layout, dir: Dir, k: u64) -> u64 {
        match dir {
            Dir::Gather => (self.start + k) * lay.sector,
            Dir::Scatter => lay.packed_offset(self.w, k),
        }
    }
}

/// Computes each window's [`Plan`] in order: `pi^-1` of every slot of the window, then the
/// rank of each sector among the window's sectors. With `map`, also records `pi`.
fn plan_windows(
    ctx: &PassCtx,
    lay: &Layout,
    dir: Dir,
    out: SyncSender<Arc<Plan>>,
    mut map: Option<Vec<u32>>,
) -> Result<Option<Vec<u32>>> {
    let mut start = 0;
    // (sector i, run position k), in run order, then sorted into packed order; and the
    // window-relative slot of run position k.
    let mut pairs: Vec<(u64, u32)> = Vec::new();
    let mut tmp = Vec::new();
    let mut batch = Vec::new();
    let mut rel: Vec<u32> = Vec::new();
    for w in 0..lay.windows() as usize {
        pairs.clear();
        rel.clear();
        let first = lay.first_slot(w);
        let cap = lay.capacity(w);
        let mut t0 = 0;
        while t0 < cap {
            let n = PLAN_BATCH.min(cap - t0);
            batch.resize(n as usize, 0);
            ctx.placement.sectors_of(first + t0, &mut batch);
            for (t, &i) in (t0..).zip(&batch) {
                if i != pdguard_core::placement::EMPTY {
                    pairs.push((i, pairs.len() as u32));
                    rel.push(t as u32);
                }
            }
            t0 += n;
        }
        if pairs.is_empty() {
            continue;
        }
        sort_by_sector(&mut pairs, &mut tmp, ctx.geometry.sectors());
        if let Some(m) = map.as_mut() {
            for &(i, k) in &pairs {
                m[i as usize] = (first + u64::from(rel[k as usize])) as u32;
            }
        }
        // Now pairs[r].1 is the run position of the sector packed at rank r.
        let from = match dir {
            Dir::Scatter => pairs.iter().map(|p| p.1).collect(),
            Dir::Gather => {
                let mut from = vec![0u32; pairs.len()];
                for (r, &(_, k)) in pairs.iter().enumerate() {
                    from[k as usize] = r as u32;
                }
                from
            }
        };
        let count = pairs.len() as u64;
        let plan = Plan {
            w,
            start,
            count,
            from,
        };
        if out.send(Arc::new(plan)).is_err() {
            return Ok(None); // the consumer left; it says why
        }
        start += count;
    }
    if start != ctx.geometry.sectors() {
        return Err(internal(
            "the placement's used slots do not match the sectors",
        ));
    }
    Ok(map)
}

/// Sorts `v` by sector index (`.0`, below `sectors`): an LSD radix sort, 11 bits a pass, for
/// all but small windows (a window holds up to millions of sectors, and a comparison sort of
/// every window was most of a sealed pass's planning).
fn sort_by_sector(v: &mut Vec<(u64, u32)>, tmp: &mut Vec<(u64, u32)>, sectors: u64) {
    const BITS: u32 = 11;
    if v.len() < 1024 {
        v.sort_unstable_by_key(|p| p.0);
        return;
    }
    let key_bits = u64::BITS - sectors.saturating_sub(1).leading_zeros();
    let mask = (1u64 << BITS) - 1;
    let mut shift = 0;
    while shift < key_bits {
        let mut count = [0usize; 1 << BITS];
        for &(i, _) in v.iter() {
            count[((i >> shift) & mask) as usize] += 1;
        }
        let mut sum = 0;
        for c in &mut count {
            (*c, sum) = (sum, sum + *c);
        }
        tmp.clear();
        tmp.resize(v.len(), (0, 0));
        for &e in v.iter() {
            let d = ((e.0 >> shift) & mask) as usize;
            tmp[count[d]] = e;
            count[d] += 1;
        }
        mem::swap(v, tmp);
        shift += BITS;
    }
}

/// [`plan_windows`] for a gather from a [`SlotMap`] of the same placement: no `pi^-1`, no
/// sort. The sectors are grouped by window in ascending `i` (packed order); a sector's run
/// position is the rank of its slot among the window's used slots.
fn plan_from_map(lay: &Layout, map: Vec<u32>, out: SyncSender<Arc<Plan>>) -> Result<()> {
    let windows = lay.windows() as usize;
    let mut start = vec![0usize; windows + 1];
    for &t in &map {
        start[lay.window_of(u64::from(t)) + 1] += 1;
    }
    for w in 0..windows {
        start[w + 1] += start[w];
    }
    // Window-relative slots, grouped by window, each group in ascending i.
    let mut grouped = vec![0u32; map.len()];
    let mut fill = start.clone();
    for &t in &map {
        let w = lay.window_of(u64::from(t));
        grouped[fill[w]] = (u64::from(t) - lay.first_slot(w)) as u32;
        fill[w] += 1;
    }
    drop(map);
    let (mut used, mut before) = (Vec::new(), Vec::new());
    for w in 0..windows {
        let rel = &grouped[start[w]..start[w + 1]];
        if rel.is_empty() {
            continue;
        }
        let mut from = vec![0u32; rel.len()];
        if rel.len() as u64 == lay.capacity(w) {
            // Every slot is used: the run position is the relative slot.
            for (r, &k) in rel.iter().enumerate() {
                from[k as usize] = r as u32;
            }
        } else {
            // The run position is the number of used slots below: a bitmap with counts.
            used.clear();
            used.resize(lay.capacity(w).div_ceil(64) as usize, 0u64);
            for &k in rel {
                used[k as usize / 64] |= 1 << (k % 64);
            }
            before.clear();
            let mut acc = 0u32;
            for &word in &used {
                before.push(acc);
                acc += word.count_ones();
            }
            for (r, &k) in rel.iter().enumerate() {
                let (q, bit) = (k as usize / 64, k % 64);
                let rank = before[q] + (used[q] & ((1u64 << bit) - 1)).count_ones();
                from[rank as usize] = r as u32;
            }
        }
        let plan = Plan {
            w,
            start: start[w] as u64,
            count: rel.len() as u64,
            from,
        };
        if out.send(Arc::new(plan)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads the source of every plan: for each slice of a window, its whole source in pieces
/// of `q` sectors, skipping the source's holes. Hashes the source during the first slice if
/// given a hasher.
#[allow(clippy::too_many_arguments)]
fn read_plans(
    src: &dyn Disk,
    lay: &Layout,
    dir: Dir,
    q: u64,
    plans: Receiver<Arc<Plan>>,
    back: Receiver<Vec<u8>>,
    out: SyncSender<Piece>,
    mut hasher: Option<ImageHasher>,
) -> Result<Option<blake3::Hash>> {
    let s = lay.sector;
    let map = src.data_map()?;
    let mut made = 0;
    for plan in plans {
        let parts = plan.count.div_ceil(q);
        for slice in 0..parts {
            for piece in 0..parts {
                let p0 = piece * q;
                let n = q.min(plan.count - p0);
                let Ok(mut buf) = spare(&back, &mut made, 2, (q * s) as usize) else {
                    return Ok(None);
                };
                let off = plan.src(lay, dir, p0);
                let ranges = data_sectors(&map, off, n, s);
                let present = presence(&ranges, n);
                // Only the sectors read are ever looked at: no need to zero the others.
                if buf.len() < (n * s) as usize {
                    buf.resize((n * s) as usize, 0);
                }
                buf.truncate((n * s) as usize);
                let hash = slice == 0 && hasher.is_some();
                let mut hashed = 0;
                for &(a, b) in &ranges {
                    let part = &mut buf[(a * s) as usize..(b * s) as usize];
                    src.read_at(part, off + a * s)?;
                    if let (true, Some(h)) = (hash, hasher.as_mut()) {
                        h.update_zeros((a - hashed) * s);
                        h.update(part);
                        hashed = b;
                    }
                }
                if let (true, Some(h)) = (hash, hasher.as_mut()) {
                    h.update_zeros((n - hashed) * s);
                }
                if dir == Dir::Gather && slice + 1 == parts {
                    src.release(off, n * s);
                }
                let p = Piece {
                    plan: Arc::clone(&plan),
                    slice,
                    piece,
                    buf,
                    present,
                };
                if out.send(p).is_err() {
                    return Ok(None);
                }
            }
        }
    }
    Ok(hasher.map(|h| h.finalize()))
}

/// Sends destination sectors `[t0, t0 + n)` of a window to the writer, one message per
/// [`WRITE_CHUNK`] (`sector(t)`: the bytes of destination sector `t`, `None` for zeros from
/// a hole of the source). Pages (4 KiB of the destination, at least one sector) that hold any data are
/// sent as bytes, the zeros in them included, since a file system allocates whole blocks
/// anyway; pages of zeros only are sent as runs of zeros, which cost nothing over a hole.
#[allow(clippy::too_many_arguments)]
fn emit<'b>(
    lay: &Layout,
    plan: &Plan,
    dir: Dir,
    (t0, n): (u64, u64),
    sector: impl Fn(u64) -> Option<&'b [u8]>,
    zero: &[u8],
    jobs: &SyncSender<Out>,
    pool: &Receiver<Vec<u8>>,
    made: &mut usize,
) -> Step {
    let chunk = (WRITE_CHUNK as u64 / lay.sector).max(1);
    let mut t = t0;
    while t < t0 + n {
        let m = chunk.min(t0 + n - t);
        emit_chunk(lay, plan, dir, (t, m), &sector, zero, jobs, pool, made)?;
        t += m;
    }
    Ok(())
}

/// One message of [`emit`].
#[allow(clippy::too_many_arguments)]
fn emit_chunk<'b>(
    lay: &Layout,
    plan: &Plan,
    dir: Dir,
    (t0, n): (u64, u64),
    sector: &impl Fn(u64) -> Option<&'b [u8]>,
    zero: &[u8],
    jobs: &SyncSender<Out>,
    pool: &Receiver<Vec<u8>>,
    made: &mut usize,
) -> Step {
    let s = lay.sector;
    let unit = (4096 / s).max(1);
    let base = plan.dst(lay, dir, 0) / s;
    let mut buf = spare(pool, made, OUT_BUFS, WRITE_CHUNK.max(s as usize))?;
    buf.clear();
    let mut runs: Vec<(u64, Run)> = Vec::new();
    let mut t = t0;
    while t < t0 + n {
        let end = (((base + t) / unit + 1) * unit - base).min(t0 + n);
        if (t..end).any(|k| sector(k).is_some()) {
            let at = buf.len();
            for k in t..end {
                buf.extend_from_slice(sector(k).unwrap_or(zero));
            }
            match runs.last_mut() {
                Some((_, Run::Bytes(r))) => r.end = buf.len(),
                _ => runs.push((plan.dst(lay, dir, t), Run::Bytes(at..buf.len()))),
            }
        } else {
            let len = (end - t) * s;
            match runs.last_mut() {
                Some((_, Run::Zeros(z))) => *z += len,
                _ => runs.push((plan.dst(lay, dir, t), Run::Zeros(len))),
            }
        }
        t = end;
    }
    jobs.send(Out::Runs(buf, runs)).map_err(|_| Stop::Peer)
}

/// The calling thread of a sealed pass: builds each window's destination from the pieces
/// of its source and hands it to the writer in small pieces, still hot in the cache.
#[allow(clippy::too_many_arguments)]
fn permute_main(
    ctx: &PassCtx,
    lay: &Layout,
    dir: Dir,
    q: u64,
    pieces: Receiver<Piece>,
    back: Sender<Vec<u8>>,
    jobs: SyncSender<Out>,
    pool: Receiver<Vec<u8>>,
) -> Step {
    let s = lay.sector as usize;
    let zero = vec![0u8; s];
    let mut made = 0;
    let mut slice = Vec::new();
    let mut slice_has = Vec::new();
    let mut done = 0u64;
    for p in pieces.iter() {
        let plan = &*p.plan;
        let parts = plan.count.div_ceil(q);
        let d0 = p.slice * q;
        let dn = q.min(plan.count - d0);
        if parts == 1 {
            // The whole source is in this piece: emit the destination in order.
            let sector = |t: u64| {
                let f = u64::from(plan.from[t as usize]);
                p.has(f)
                    .then(|| &p.buf[f as usize * s..(f as usize + 1) * s])
            };
            emit(
                lay,
                plan,
                dir,
                (0, dn),
                sector,
                &zero,
                &jobs,
                &pool,
                &mut made,
            )?;
            ctx.progress.advance(dn * lay.sector);
            done += dn;
            let _ = back.send(p.buf);
            continue;
        }
        // A window larger than a slice: destination [d0, d0 + dn) collects its sectors
        // from every piece of the source, [s0, s0 + sn) at a time.
        let s0 = p.piece * q;
        let sn = (p.buf.len() / s) as u64;
        if p.piece == 0 {
            // Only the sectors marked in `slice_has` are read back: no need to zero `slice`.
            if slice.len() < dn as usize * s {
                slice.resize(dn as usize * s, 0);
            }
            slice_has.clear();
            slice_has.resize(dn as usize, false);
        }
        for t in d0..d0 + dn {
            let f = u64::from(plan.from[t as usize]);
            if f >= s0 && f < s0 + sn && p.has(f - s0) {
                let (a, b) = ((f - s0) as usize * s, (t - d0) as usize * s);
                slice[b..b + s].copy_from_slice(&p.buf[a..a + s]);
                slice_has[(t - d0) as usize] = true;
            }
        }
        let _ = back.send(p.buf);
        if p.piece + 1 == parts {
            let sector = |t: u64| {
                let k = (t - d0) as usize;
                slice_has[k].then(|| &slice[k * s..(k + 1) * s])
            };
            emit(
                lay,
                plan,
                dir,
                (d0, dn),
                sector,
                &zero,
                &jobs,
                &pool,
                &mut made,
            )?;
            done += dn;
            ctx.progress.advance(dn * lay.sector);
        }
    }
    if done != ctx.geometry.sectors() {
        return Err(Stop::Peer);
    }
    Ok(())
}

impl Window {
    /// A sealed pass: a planner thread computes each window's reordering, a reader thread reads
    /// its source, the calling thread reorders, a writer thread writes. The digest is of the
    /// sealed image: hashed by the writer when gathering, by the reader when scattering.
    fn sealed_pass(
        &self,
        ctx: &PassCtx,
        dir: Dir,
        src: &dyn Disk,
        dst: &dyn Disk,
    ) -> Result<blake3::Hash> {
        let t0 = Instant::now();
        let lay = Layout::new(&ctx.geometry);
        let b = Budget::new(ctx.memory_bytes, &lay);
        let q = b.slice;
        let mut digest = None;
        let old = self.take_map(ctx);
        let mut kept = None;
        thread::scope(|sc| {
            let (plan_tx, plan_rx) = sync_channel(2);
            let planner = spawn(sc, "pdguard-plan", move || match (dir, old) {
                (Dir::Gather, Some(map)) => plan_from_map(&lay, map, plan_tx).map(|()| None),
                (Dir::Gather, None) => plan_windows(ctx, &lay, dir, plan_tx, None),
                (Dir::Scatter, _) => {
                    let map =
                        Self::may_map(ctx).then(|| vec![0u32; ctx.geometry.sectors() as usize]);
                    plan_windows(ctx, &lay, dir, plan_tx, map)
                }
            });
            let (piece_tx, piece_rx) = sync_channel(1);
            let (back_tx, back_rx) = channel();
            let read_hasher = (dir == Dir::Scatter).then(|| ctx.sealed_hasher());
            let reader = spawn(sc, "pdguard-read", move || {
                read_plans(src, &lay, dir, q, plan_rx, back_rx, piece_tx, read_hasher)
            });
            let (job_tx, job_rx) = sync_channel(OUT_BUFS - 2);
            let (spare_tx, spare_rx) = channel();
            let write_hasher = (dir == Dir::Gather).then(|| ctx.sealed_hasher());
            let writer = spawn(sc, "pdguard-write", move || {
                write_jobs(dst, job_rx, spare_tx, write_hasher)
            });
            let main = permute_main(ctx, &lay, dir, q, piece_rx, back_tx, job_tx, spare_rx);
            let read = joined(reader).map(|h| {
                if h.is_some() {
                    digest = h;
                }
            });
            let wrote = joined(writer).map(|h| {
                if h.is_some() {
                    digest = h;
                }
            });
            let planned = joined(planner).map(|m| kept = m);
            settle(main, [planned, read, wrote])
        })?;
        if let Some(map) = kept {
            self.keep_map(ctx, map);
        }
        let pass = match dir {
            Dir::Gather => "gather sealed",
            Dir::Scatter => "scatter sealed",
        };
        log_pass(pass, ctx, &lay, &b, t0);
        digest.ok_or_else(|| internal("no digest of the sealed image"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::strategy::DEFAULT_MEMORY_BYTES;
    use pdguard_core::{Placement, PlacementKind};
    use std::sync::atomic::{AtomicU64, Ordering};

    fn lay(sectors: u64, slots: u64, sector: u32) -> Layout {
        Layout::new(
            &Geometry::with_slots(sectors, slots, sector, 32).unwrap_or_else(|e| panic!("{e}")),
        )
    }

    /// A placement that counts its evaluations.
    struct Counting<'a>(&'a dyn Placement, AtomicU64, AtomicU64);

    impl Placement for Counting<'_> {
        fn sectors(&self) -> u64 {
            self.0.sectors()
        }
        fn slots(&self) -> u64 {
            self.0.slots()
        }
        fn slot_of(&self, sector: u64) -> u64 {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.slot_of(sector)
        }
        fn sector_of(&self, slot: u64) -> Option<u64> {
            self.2.fetch_add(1, Ordering::Relaxed);
            self.0.sector_of(slot)
        }
    }

    #[test]
    fn a_job_evaluates_the_placement_once_when_the_budget_allows() {
        use crate::jobs::NoProgress;
        use crate::store::sim::SimStorage;
        let g = Geometry::new(2000 * 512, 512, 32, 25).unwrap_or_else(|e| panic!("{e}"));
        let (n, m) = (g.sectors(), g.thin_sectors());
        let inner = pdguard_core::placement::build(PlacementKind::Feistel, b"k", n, m)
            .unwrap_or_else(|e| panic!("{e}"));
        let p = Counting(&*inner, AtomicU64::new(0), AtomicU64::new(0));
        let st = SimStorage::new(Vec::new());
        let disk = |name: &str, len| st.scratch_disk(name, len);
        let (image, thin) = (disk("image", g.disk_bytes()), disk("thin", g.thin_bytes()));
        let (slot_of, sector_of) = (
            || p.1.load(Ordering::Relaxed),
            || p.2.load(Ordering::Relaxed),
        );
        for (memory, mapped) in [(DEFAULT_MEMORY_BYTES, true), (8 * n, false)] {
            let ctx = PassCtx {
                geometry: g,
                placement: &p,
                cipher: None,
                digest_key: None,
                digest: pdguard_core::digest::DigestScheme::DEFAULT,
                keep_holes: false,
                progress: &NoProgress,
                memory_bytes: memory,
            };
            let w = Window::default();
            let run = |f: &dyn Fn() -> Result<blake3::Hash>| {
                let before = (slot_of(), sector_of());
                f().unwrap_or_else(|e| panic!("{e}"));
                (slot_of() - before.0, sector_of() - before.1)
            };
            // Each pass that uses or keeps a map probes pi three times.
            let probes = if mapped { 3 } else { 0 };
            let scatter = run(&|| w.scatter_plain(&ctx, &*image, &*thin));
            assert_eq!(scatter, (n + probes, 0), "memory {memory}");
            assert_eq!(w.lock().is_some(), mapped);
            let gather = run(&|| w.gather_sealed(&ctx, &*thin, &*image));
            let want = if mapped { (3, 0) } else { (0, m) };
            assert_eq!(gather, want, "memory {memory}");
            assert!(w.lock().is_none(), "a map outlived the pass that used it");
            let scatter = run(&|| w.scatter_sealed(&ctx, &*image, &*thin));
            assert_eq!(scatter, (probes, m), "memory {memory}");
            let gather = run(&|| w.gather_plain(&ctx, &*thin, &*image));
            let want = if mapped { (3, 0) } else { (n, 0) };
            assert_eq!(gather, want, "memory {memory}");
        }
    }

    /// A disk that only records what is released.
    #[derive(Default)]
    struct Releases(Mutex<Vec<(u64, u64)>>);

    impl Disk for Releases {
        fn len(&self) -> u64 {
            u64::MAX
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> Result<()> {
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
            Ok(())
        }
        fn sync(&self) -> Result<()> {
            Ok(())
        }
        fn release(&self, offset: u64, len: u64) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((offset, len));
        }
    }

    #[test]
    fn write_behind_releases_every_large_range_once_and_leaves_small_ones_to_fsync() {
        let k = 256 << 10;
        let d = Releases::default();
        let mut wb = WriteBehind::default();
        // 40 consecutive writes, then two interleaved streams, then one more write.
        for n in 0..40 {
            wb.wrote(&d, n * k, k);
        }
        for n in 0..3 {
            wb.wrote(&d, (100 + n) * k, k);
            wb.wrote(&d, (200 + n) * k, k);
        }
        wb.wrote(&d, 300 * k, 100);
        wb.flush(&d);
        let got = d.0.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut want = vec![(0, RELEASE_BYTES), (RELEASE_BYTES, RELEASE_BYTES)];
        want.push((2 * RELEASE_BYTES, 40 * k - 2 * RELEASE_BYTES));
        for n in 0..3 {
            want.push(((100 + n) * k, k));
            want.push(((200 + n) * k, k));
        }
        // The last write, 100 bytes on its own, is left to the fsync.
        assert_eq!(got, want);
    }

    #[test]
    fn radix_sort_sorts_by_sector_like_a_comparison_sort() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for (len, sectors) in [(0usize, 1u64), (5, 10), (5000, 5000), (20_000, 1 << 40)] {
            let mut v: Vec<(u64, u32)> = (0..len)
                .map(|k| (rng.gen_range(0..sectors), k as u32))
                .collect();
            let mut want = v.clone();
            want.sort_by_key(|p| p.0); // stable, like the radix sort
            sort_by_sector(&mut v, &mut Vec::new(), sectors);
            assert_eq!(v, want, "len {len}");
        }
    }

    #[test]
    fn isqrt_is_exact() {
        for n in [
            0u128,
            1,
            2,
            3,
            4,
            15,
            16,
            17,
            1 << 49,
            (1 << 97) - 1,
            99_999_999_999,
        ] {
            let r = isqrt(n);
            assert!(r * r <= n && (r + 1) * (r + 1) > n, "{n}");
        }
    }

    #[test]
    fn layout_depends_on_slots_and_sector_size_only_and_is_pinned() {
        // Pinned: a change here changes where resumed jobs look for their sectors.
        let cases = [
            (6u64, 12u64, 512u32, 2u64),
            (24, 24, 512, 3),
            (1, 1, 512, 1),
            (8 << 20, 8 << 20, 512, 46_340),
            (1 << 20, 1 << 20, 4096, 5_792),
            (128 << 20, 128 << 20, 512, 185_363),
        ];
        for (n, m, s, k) in cases {
            assert_eq!(lay(n, m, s).window_slots(), k, "N={n} M={m} S={s}");
            assert_eq!(lay(n.min(m / 2).max(1), m, s), lay(n, m, s));
        }
    }

    #[test]
    fn budget_stays_within_memory_above_the_floor() {
        let l = lay(8 << 20, 8 << 20, 512);
        let b = Budget::new(256 << 20, &l);
        let plain = CHUNKS * b.chunk + (l.windows() as usize + b.in_flight) * b.window_buf;
        assert!(plain <= 256 << 20, "{b:?}");
        assert!(4 * b.slice * 512 <= 256 << 20, "{b:?}");
        assert_eq!(b.slice, l.window_slots(), "a window fits in one slice");
        let tiny = Budget::new(1, &l);
        assert_eq!((tiny.chunk, tiny.window_buf), (512, 512));
        assert_eq!(tiny.slice, l.window_slots().div_ceil(MAX_SLICES));
    }
}
