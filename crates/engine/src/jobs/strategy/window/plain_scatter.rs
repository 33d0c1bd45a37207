//! The plain scatter (seal, pass 1): the image read in order, each sector appended to its
//! window's buffer, full buffers written at the window's next packed place.

use super::*;

/// The window buffers of a plain scatter: each holds the next packed sectors of its window,
/// from packed rank `sent[w]` on.
pub(super) struct Buckets<'a> {
    pub(super) lay: &'a Layout,
    pub(super) b: &'a Budget,
    pub(super) bufs: Vec<Vec<u8>>,
    /// Fill level at which a window's buffer is sent (staggered for the first send).
    pub(super) limit: Vec<usize>,
    /// Packed sectors of each window already sent to the writer, or skipped as zeros.
    pub(super) sent: Vec<u64>,
    pub(super) made: usize,
    pub(super) jobs: SyncSender<Out>,
    pub(super) pool: Receiver<Vec<u8>>,
}

impl<'a> Buckets<'a> {
    pub(super) fn new(
        lay: &'a Layout,
        b: &'a Budget,
        jobs: SyncSender<Out>,
        pool: Receiver<Vec<u8>>,
    ) -> Self {
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
    pub(super) fn push(&mut self, ctx: &PassCtx, w: usize, slot: u64, sector: &[u8]) -> Step {
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
    pub(super) fn skip(&mut self, w: usize) -> Step {
        if !self.bufs[w].is_empty() {
            self.send(w)?;
        }
        self.sent[w] += 1;
        Ok(())
    }

    pub(super) fn send(&mut self, w: usize) -> Step {
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

    pub(super) fn finish(mut self) -> Step {
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
pub(super) fn scatter_main(
    ctx: &PassCtx,
    lay: &Layout,
    b: &Budget,
    full: Receiver<Chunk>,
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
    }
    if i != ctx.geometry.sectors() {
        return Err(Stop::Peer);
    }
    buckets.finish()
}
