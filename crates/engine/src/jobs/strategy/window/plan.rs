//! The plans of a sealed pass: for each window, which source sector goes to each
//! destination place (from `pi^-1` and a sort, or from a [`SlotMap`](super::SlotMap)).

use super::*;

/// Which sealed pass: gather (packed region to sealed run) or scatter (the inverse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    Gather,
    Scatter,
}

/// One window of a sealed pass: its run starts at sealed sector `start` and holds `count`
/// sectors; destination sector `t` of the window (run position when gathering, packed rank
/// when scattering) is source sector `from[t]`.
pub(super) struct Plan {
    pub(super) w: usize,
    pub(super) start: u64,
    pub(super) count: u64,
    pub(super) from: Vec<u32>,
}

/// A piece of a window's source, read for one slice of its destination.
pub(super) struct Piece {
    pub(super) plan: Arc<Plan>,
    pub(super) slice: u64,
    pub(super) piece: u64,
    pub(super) buf: Vec<u8>,
    /// Which of the piece's sectors were read, one bit each; `None`: all of them. A sector
    /// not read lies in a hole of the source, so it is zeros, and its bytes in `buf` are
    /// stale.
    pub(super) present: Option<Vec<u64>>,
}

impl Piece {
    pub(super) fn has(&self, k: u64) -> bool {
        match &self.present {
            Some(m) => m[(k / 64) as usize] >> (k % 64) & 1 == 1,
            None => true,
        }
    }
}

/// The bitmap of `n` sectors set in `ranges` (from [`data_sectors`]), `None` when all are.
pub(super) fn presence(ranges: &[(u64, u64)], n: u64) -> Option<Vec<u64>> {
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
pub(super) fn data_sectors(
    map: &crate::store::DataMap,
    off: u64,
    n: u64,
    s: u64,
) -> Vec<(u64, u64)> {
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
    pub(super) fn src(&self, lay: &Layout, dir: Dir, k: u64) -> u64 {
        match dir {
            Dir::Gather => lay.packed_offset(self.w, k),
            Dir::Scatter => (self.start + k) * lay.sector,
        }
    }

    pub(super) fn dst(&self, lay: &Layout, dir: Dir, k: u64) -> u64 {
        match dir {
            Dir::Gather => (self.start + k) * lay.sector,
            Dir::Scatter => lay.packed_offset(self.w, k),
        }
    }
}

/// Computes each window's [`Plan`] in order: `pi^-1` of every slot of the window, then the
/// rank of each sector among the window's sectors. With `map`, also records `pi`.
pub(super) fn plan_windows(
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

/// [`plan_windows`] for a gather from a [`SlotMap`] of the same placement: no `pi^-1`, no
/// sort. The sectors are grouped by window in ascending `i` (packed order); a sector's run
/// position is the rank of its slot among the window's used slots.
pub(super) fn plan_from_map(lay: &Layout, map: Vec<u32>, out: SyncSender<Arc<Plan>>) -> Result<()> {
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
