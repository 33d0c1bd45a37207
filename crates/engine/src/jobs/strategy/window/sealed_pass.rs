//! The sealed passes (seal gather, unseal scatter): read each window's source, reorder it
//! in memory by its plan and emit it to the writer in small pieces.

use super::*;

/// Reads the source of every plan: for each slice of a window, its whole source in pieces
/// of `q` sectors, skipping the source's holes. Hashes the source during the first slice if
/// given a hasher.
#[allow(clippy::too_many_arguments)]
pub(super) fn read_plans(
    src: &dyn Disk,
    lay: &Layout,
    dir: Dir,
    q: u64,
    plans: Receiver<Arc<Plan>>,
    back: Receiver<Vec<u8>>,
    out: SyncSender<Piece>,
    mut hasher: Option<PassHasher<'_>>,
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
pub(super) fn emit<'b>(
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
pub(super) fn emit_chunk<'b>(
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
pub(super) fn permute_main(
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
