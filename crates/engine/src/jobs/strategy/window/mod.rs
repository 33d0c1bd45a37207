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
//! in image order, and a plain pass's region tree (the second hash of the plaintext) by a
//! hashing thread of its own, fed that helper's buffers ([`Shared`]) in the same order. Buffers are small and recycled so that the bytes the kernel copies are
//! still in the CPU cache. Windows fill at about the same rate, so their first flushes (and
//! a plain gather's first read-aheads) are staggered to spread the I/O out.
//!
//! A pass adds no fsync: the job fsyncs the thin disk after a scatter and the image after a
//! gather. The writer asks the kernel to start writing back each range it wrote
//! ([`Disk::release`]), and a gather drops the thin disk's pages it has read: the device is
//! kept busy during the pass instead of at the final fsync, and little page cache is left
//! for the thin disk's deletion.
//!
//! # Files
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the strategy: the four passes, each wiring its threads; the tuning constants; the [`SlotMap`] kept between a job's passes |
//! | `layout.rs` | [`Layout`]: windows of `K` slots |
//! | `budget.rs` | [`Budget`]: buffer and slice sizes from `--memory` |
//! | `threads.rs` | helper threads, their errors, buffer pools |
//! | `io.rs` | the sequential reader and writer threads, write-behind |
//! | `plain_scatter.rs` | seal pass 1: window buckets |
//! | `plain_gather.rs` | unseal pass 3: the merge of window streams |
//! | `plan.rs` | sealed passes: each window's plan (`pi^-1`, ranks) |
//! | `sort.rs` | the radix sort of a window's sectors |
//! | `sealed_pass.rs` | sealed passes: read the plans' sources, reorder, emit |
//! | `tests.rs` | unit tests |

use std::mem;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::Instant;

use pdguard_core::Geometry;

use super::{PassCtx, PassHasher, RegionHalf, Strategy};
use crate::store::{Disk, Result, StoreError};

mod budget;
mod io;
mod layout;
mod plain_gather;
mod plain_scatter;
mod plan;
mod sealed_pass;
mod sort;
mod threads;

use budget::*;
use io::*;
pub use layout::Layout;
use plain_gather::*;
use plain_scatter::*;
use plan::*;
use sealed_pass::*;
use sort::*;
use threads::*;

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
            let back = channel();
            let (hasher, half) = ctx.plain_hasher().split_regions();
            let (hash_tx, hashed) = hash_thread(sc, half);
            // A buffer is held by this thread or queued to it, or by the hashing thread.
            let depth = CHUNKS + if hashed.is_some() { HASH_DEPTH + 1 } else { 0 };
            let reader = spawn(sc, "pdguard-read", move || {
                read_sequential(
                    image,
                    len,
                    b.chunk,
                    depth,
                    back,
                    full_tx,
                    Some(hasher),
                    hash_tx,
                )
            });
            let (job_tx, job_rx) = sync_channel(b.in_flight);
            let (spare_tx, spare_rx) = channel();
            let writer = spawn(sc, "pdguard-write", move || {
                write_jobs(thin, job_rx, spare_tx, None, None)
            });
            let main = scatter_main(ctx, &lay, &b, full_rx, job_tx, spare_rx, map.as_mut());
            let read = joined(reader).map(|h| digest = h);
            let wrote = joined(writer).map(drop);
            settle(main, [read, wrote, joined_hash(hashed)])
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
            let (hasher, half) = ctx.plain_hasher().split_regions();
            let (hash_tx, hashed) = hash_thread(sc, half);
            // A buffer is with this thread, queued to or held by the writer, or by the
            // hashing thread.
            let bufs = CHUNKS + if hashed.is_some() { HASH_DEPTH + 1 } else { 0 };
            let writer = spawn(sc, "pdguard-write", move || {
                write_jobs(image, job_rx, spare_tx, Some(hasher), hash_tx)
            });
            let streams = Streams::new(&lay, &b, req_tx, resp_rx);
            let map = self.take_map(ctx);
            let main = gather_main(
                ctx,
                &lay,
                &b,
                streams,
                job_tx,
                (spare_rx, bufs),
                map.as_deref(),
            );
            let read = joined(reader);
            let wrote = joined(writer).map(|h| digest = h);
            settle(main, [read, wrote, joined_hash(hashed)])
        })?;
        log_pass("gather plain", ctx, &lay, &b, t0);
        digest.ok_or_else(|| internal("no digest from the writer"))
    }
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
                write_jobs(dst, job_rx, spare_tx, write_hasher, None)
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
mod tests;
