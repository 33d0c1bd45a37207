//! [`Direct`]: the patent's literal method, one sector per system call on the random side.

use super::{PassCtx, SequentialWriter, Strategy};
use crate::store::{Disk, Result};

/// The patent's literal method: the disk is read linearly and each sector is written to the
/// thin disk on its own at the drawn offset (claim 2); the thin disk is read back linearly,
/// skipping empty slots. Sequential sides use 1 MiB I/O; the random side is one sector per
/// system call.
pub struct Direct;

impl Strategy for Direct {
    fn name(&self) -> &'static str {
        "direct"
    }

    fn scatter_plain(
        &self,
        ctx: &PassCtx,
        image: &dyn Disk,
        thin: &dyn Disk,
    ) -> Result<blake3::Hash> {
        let g = ctx.geometry;
        read_in_order(ctx, image, ctx.plain_hasher(), |i, sector| {
            let slot = ctx.placement.slot_of(i);
            ctx.encrypt(slot, sector);
            thin.write_at(sector, g.offset(slot))
        })
    }

    fn gather_sealed(
        &self,
        ctx: &PassCtx,
        thin: &dyn Disk,
        image: &dyn Disk,
    ) -> Result<blake3::Hash> {
        let mut out = SequentialWriter::new(ctx, image, ctx.sealed_hasher());
        let mut inbuf = vec![0u8; ctx.chunk_sectors() as usize * ctx.sector()];
        let g = ctx.geometry;
        let mut slot = 0;
        while slot < g.thin_sectors() {
            let n = ctx.chunk_sectors().min(g.thin_sectors() - slot);
            let used: Vec<u64> = (slot..slot + n)
                .filter(|&t| ctx.placement.sector_of(t).is_some())
                .collect();
            if !used.is_empty() {
                let chunk = &mut inbuf[..n as usize * ctx.sector()];
                thin.read_at(chunk, g.offset(slot))?;
                for t in used {
                    let at = (t - slot) as usize * ctx.sector();
                    out.push(&chunk[at..at + ctx.sector()])?;
                }
            }
            slot += n;
        }
        out.finish()
    }

    fn scatter_sealed(
        &self,
        ctx: &PassCtx,
        image: &dyn Disk,
        thin: &dyn Disk,
    ) -> Result<blake3::Hash> {
        let g = ctx.geometry;
        let mut slots = (0..g.thin_sectors()).filter(|&t| ctx.placement.sector_of(t).is_some());
        read_in_order(ctx, image, ctx.sealed_hasher(), |_, sector| {
            // The placement is injective with N sectors, so exactly N slots are used.
            let Some(slot) = slots.next() else {
                unreachable!("placement has fewer used slots than sectors")
            };
            thin.write_at(sector, g.offset(slot))
        })
    }

    fn gather_plain(
        &self,
        ctx: &PassCtx,
        thin: &dyn Disk,
        image: &dyn Disk,
    ) -> Result<blake3::Hash> {
        let mut out = SequentialWriter::new(ctx, image, ctx.plain_hasher());
        let mut sector = vec![0u8; ctx.sector()];
        for i in 0..ctx.geometry.sectors() {
            let slot = ctx.placement.slot_of(i);
            thin.read_at(&mut sector, ctx.geometry.offset(slot))?;
            ctx.decrypt(slot, &mut sector);
            out.push(&sector)?;
        }
        out.finish()
    }
}

/// Reads `image` in order in 1 MiB chunks, hashing each chunk before `each(i, sector)` sees
/// (and may change) sector `i`; the digest of what was read.
fn read_in_order(
    ctx: &PassCtx,
    image: &dyn Disk,
    mut hasher: super::PassHasher<'_>,
    mut each: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<blake3::Hash> {
    let (g, s) = (ctx.geometry, ctx.sector());
    let mut buf = vec![0u8; ctx.chunk_sectors() as usize * s];
    let mut i = 0;
    while i < g.sectors() {
        let n = ctx.chunk_sectors().min(g.sectors() - i);
        let chunk = &mut buf[..n as usize * s];
        image.read_at(chunk, g.offset(i))?;
        hasher.update(chunk);
        for (k, sector) in chunk.chunks_exact_mut(s).enumerate() {
            each(i + k as u64, sector)?;
        }
        ctx.progress.advance(chunk.len() as u64);
        i += n;
    }
    Ok(hasher.finalize())
}
