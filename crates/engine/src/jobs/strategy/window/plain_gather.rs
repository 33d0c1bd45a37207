//! The plain gather (unseal, pass 3): a k-way merge of the windows' packed streams,
//! each read ahead sequentially, into the image in order.

use super::*;

/// The packed sectors of every window as streams in ascending `i`, each read ahead in two
/// halves of a window buffer by the reader thread.
pub(super) struct Streams {
    pub(super) lay: Layout,
    pub(super) s: usize,
    pub(super) half: u64,
    pub(super) cur: Vec<Vec<u8>>,
    /// Which sectors of `cur` were read (see [`Piece::present`]); `None`: all.
    pub(super) cur_present: Vec<Option<Vec<u64>>>,
    pub(super) pos: Vec<usize>,
    /// Packed sectors requested so far, per window.
    pub(super) asked: Vec<u64>,
    pub(super) pending: Vec<bool>,
    pub(super) ready: Vec<Option<Part>>,
    pub(super) req: Sender<(usize, u64, Vec<u8>)>,
    pub(super) resp: Receiver<(usize, Part)>,
}

/// Bytes read for a stream, and which of their sectors were read (the others are holes).
pub(super) type Part = (Vec<u8>, Option<Vec<u64>>);

impl Streams {
    pub(super) fn new(
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
    pub(super) fn request(&mut self, w: usize, mut buf: Vec<u8>) -> Step {
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

    pub(super) fn start(&mut self) -> Step {
        for w in 0..self.cur.len() {
            self.request(w, Vec::new())?;
        }
        Ok(())
    }

    /// The next sector of window `w`; `None` for a sector of zeros in a hole of the thin disk.
    pub(super) fn next(&mut self, w: usize) -> Step<Option<&[u8]>> {
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

    pub(super) fn refill(&mut self, w: usize) -> Step {
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
pub(super) fn gather_main(
    ctx: &PassCtx,
    lay: &Layout,
    b: &Budget,
    mut streams: Streams,
    jobs: SyncSender<Out>,
    (pool, bufs): (Receiver<Vec<u8>>, usize),
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
        let mut out = spare(&pool, &mut made, bufs, b.chunk)?;
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
