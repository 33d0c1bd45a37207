//! How the passes move bytes. A strategy may change the I/O pattern, never the bytes that
//! end up on either disk (DESIGN.md §3): every strategy must give the same image as
//! [`Direct`] for the same record.
//!
//! The four passes, with `pi` the placement, `u_0 < u_1 < ...` the used thin slots in
//! ascending order and `E`/`D` the profile's sector cipher (identity in `patent`):
//!
//! | pass            | job            | moves                                         |
//! |-----------------|----------------|-----------------------------------------------|
//! | plain scatter   | seal, pass 1   | `thin[pi(i)] = E(image[i])`, `i` ascending     |
//! | sealed gather   | seal, pass 3   | `image[j] = thin[u_j]`, `j` ascending          |
//! | sealed scatter  | unseal, pass 1 | `thin[u_j] = image[j]`, `j` ascending          |
//! | plain gather    | unseal, pass 3 | `image[i] = D(thin[pi(i)])`, `i` ascending     |
//!
//! Sealed gather is the patent's "copy the thin disk back linearly, skipping empty
//! sectors" ([043]-[045]); the unseal passes are the exact inverses of the seal passes.

use pdguard_core::{Geometry, Placement};

use super::Progress;
use crate::store::{Disk, Result};
use pdguard_core::cipher::SectorCipher;

/// Bytes read or written per sequential I/O.
const CHUNK_BYTES: usize = 1 << 20;

/// Everything a pass needs besides the two disks.
pub struct PassCtx<'a> {
    pub geometry: Geometry,
    pub placement: &'a dyn Placement,
    pub cipher: Option<&'a dyn SectorCipher>,
    /// Keys the plaintext digest in the secure profile.
    pub digest_key: Option<[u8; 32]>,
    pub progress: &'a dyn Progress,
}

impl PassCtx<'_> {
    /// The hasher of the plaintext digest: keyed in the secure profile.
    fn plain_hasher(&self) -> blake3::Hasher {
        match &self.digest_key {
            Some(k) => blake3::Hasher::new_keyed(k),
            None => blake3::Hasher::new(),
        }
    }

    fn sector(&self) -> usize {
        self.geometry.sector_size() as usize
    }

    fn chunk_sectors(&self) -> u64 {
        (CHUNK_BYTES / self.sector()).max(1) as u64
    }
}

/// A way of moving bytes through the four passes. Each pass returns the BLAKE3 digest of
/// the plaintext (plain passes) or of the sealed image (sealed passes), in image order.
pub trait Strategy: Send + Sync {
    fn name(&self) -> &'static str;
    fn scatter_plain(
        &self,
        ctx: &PassCtx,
        image: &dyn Disk,
        thin: &dyn Disk,
    ) -> Result<blake3::Hash>;
    fn gather_sealed(
        &self,
        ctx: &PassCtx,
        thin: &dyn Disk,
        image: &dyn Disk,
    ) -> Result<blake3::Hash>;
    fn scatter_sealed(
        &self,
        ctx: &PassCtx,
        image: &dyn Disk,
        thin: &dyn Disk,
    ) -> Result<blake3::Hash>;
    fn gather_plain(
        &self,
        ctx: &PassCtx,
        thin: &dyn Disk,
        image: &dyn Disk,
    ) -> Result<blake3::Hash>;
}

/// The strategies a record may name.
pub fn by_name(name: &str) -> Option<Box<dyn Strategy>> {
    match name {
        "direct" => Some(Box::new(Direct)),
        _ => None,
    }
}

/// Names of every strategy, for help texts.
pub const STRATEGIES: &[&str] = &["direct"];

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
        let (g, s) = (ctx.geometry, ctx.sector());
        let mut hasher = ctx.plain_hasher();
        let mut buf = vec![0u8; ctx.chunk_sectors() as usize * s];
        let mut i = 0;
        while i < g.sectors() {
            let n = ctx.chunk_sectors().min(g.sectors() - i);
            let chunk = &mut buf[..n as usize * s];
            image.read_at(chunk, g.offset(i))?;
            hasher.update(chunk);
            for (k, sector) in chunk.chunks_exact_mut(s).enumerate() {
                let slot = ctx.placement.slot_of(i + k as u64);
                if let Some(c) = ctx.cipher {
                    c.encrypt(slot, sector);
                }
                thin.write_at(sector, g.offset(slot))?;
            }
            ctx.progress.advance(chunk.len() as u64);
            i += n;
        }
        Ok(hasher.finalize())
    }

    fn gather_sealed(
        &self,
        ctx: &PassCtx,
        thin: &dyn Disk,
        image: &dyn Disk,
    ) -> Result<blake3::Hash> {
        let mut out = SequentialWriter::new(ctx, image, blake3::Hasher::new());
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
        let (g, s) = (ctx.geometry, ctx.sector());
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; ctx.chunk_sectors() as usize * s];
        let mut slots = (0..g.thin_sectors()).filter(|&t| ctx.placement.sector_of(t).is_some());
        let mut j = 0;
        while j < g.sectors() {
            let n = ctx.chunk_sectors().min(g.sectors() - j);
            let chunk = &mut buf[..n as usize * s];
            image.read_at(chunk, g.offset(j))?;
            hasher.update(chunk);
            for sector in chunk.chunks_exact(s) {
                // The placement is injective with N sectors, so exactly N slots are used.
                let Some(slot) = slots.next() else {
                    unreachable!("placement has fewer used slots than sectors")
                };
                thin.write_at(sector, g.offset(slot))?;
            }
            ctx.progress.advance(chunk.len() as u64);
            j += n;
        }
        Ok(hasher.finalize())
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
            if let Some(c) = ctx.cipher {
                c.decrypt(slot, &mut sector);
            }
            out.push(&sector)?;
        }
        out.finish()
    }
}

/// Collects sectors for image positions 0, 1, 2, ... and writes them in 1 MiB runs,
/// hashing what it writes.
struct SequentialWriter<'a> {
    ctx: &'a PassCtx<'a>,
    image: &'a dyn Disk,
    buf: Vec<u8>,
    next: u64,
    hasher: blake3::Hasher,
}

impl<'a> SequentialWriter<'a> {
    fn new(ctx: &'a PassCtx<'a>, image: &'a dyn Disk, hasher: blake3::Hasher) -> Self {
        Self {
            ctx,
            image,
            buf: Vec::with_capacity(CHUNK_BYTES),
            next: 0,
            hasher,
        }
    }

    fn push(&mut self, sector: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(sector);
        if self.buf.len() >= CHUNK_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.image
            .write_at(&self.buf, self.ctx.geometry.offset(self.next))?;
        self.hasher.update(&self.buf);
        self.next += (self.buf.len() / self.ctx.sector()) as u64;
        self.ctx.progress.advance(self.buf.len() as u64);
        self.buf.clear();
        Ok(())
    }

    fn finish(mut self) -> Result<blake3::Hash> {
        self.flush()?;
        debug_assert_eq!(self.next, self.ctx.geometry.sectors());
        Ok(self.hasher.finalize())
    }
}
