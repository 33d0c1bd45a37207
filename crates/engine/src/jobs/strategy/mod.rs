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
//!
//! All four passes of one strategy agree on one thin-disk layout: a job rolls back across
//! directions (an unseal may gather plain from a seal's thin disk, a seal may gather sealed
//! from an unseal's), and a resumed job uses the strategy named in the record.
//!
//! - [`Direct`] (`direct`): the patent's literal method; slot `s` of the thin disk is bytes
//!   `[s*S, (s+1)*S)`; one system call per sector on the random side.
//! - [`Window`] (`window`, the default): large sequential I/O only, the thin disk in
//!   windows of packed sectors (see `window/mod.rs` and `docs/on-disk-layout.md`).

mod direct;
mod window;

pub use direct::Direct;
pub use window::{Layout, Window};

use pdguard_core::{Geometry, Placement};

use super::Progress;
use crate::store::{Disk, Result};
use pdguard_core::cipher::SectorCipher;
use pdguard_core::digest::{is_zero, DigestScheme, ImageHasher};
use pdguard_core::region_tree::{RegionHasher, RegionKeys, RegionLayout, RegionTree};

/// Default memory budget of a pass (`--memory`): buffers, windows and read-ahead together.
pub const DEFAULT_MEMORY_BYTES: u64 = 256 << 20;

/// The strategy a new seal uses unless told otherwise.
pub const DEFAULT_STRATEGY: &str = "window";

/// Bytes read or written per sequential I/O.
const CHUNK_BYTES: usize = 1 << 20;

/// Everything a pass needs besides the two disks.
pub struct PassCtx<'a> {
    pub geometry: Geometry,
    pub placement: &'a dyn Placement,
    pub cipher: Option<&'a dyn SectorCipher>,
    /// Keys the plaintext digest in the secure profile.
    pub digest_key: Option<&'a [u8; 32]>,
    /// How the passes' digests are computed (the record's `digest`).
    pub digest: DigestScheme,
    /// Secure profile with `--keep-holes`: sectors of zeros are neither encrypted nor
    /// decrypted, so they stay zeros (and holes stay holes).
    pub keep_holes: bool,
    pub progress: &'a dyn Progress,
    /// Memory a pass may use for its buffers, in bytes (`--memory`). Changes how bytes are
    /// moved (buffer and I/O sizes), never where they go: the layout depends only on the
    /// geometry in the record.
    pub memory_bytes: u64,
    /// The region digest tree of the plaintext, made beside the plaintext digest by the
    /// plain pass that gets it (seal scatter, unseal gather); `None`: no tree.
    pub regions: Option<&'a RegionTap>,
}

impl<'a> PassCtx<'a> {
    /// The hasher of the plaintext digest: keyed in the secure profile; it feeds the
    /// region tree too when the job asked for one.
    fn plain_hasher(&self) -> PassHasher<'a> {
        PassHasher {
            image: ImageHasher::new(self.digest, self.digest_key),
            regions: self.regions.map(|tap| (tap, tap.take())),
        }
    }

    /// The hasher of the sealed image's digest: never keyed (anyone may verify it).
    fn sealed_hasher(&self) -> PassHasher<'a> {
        PassHasher {
            image: ImageHasher::new(self.digest, None),
            regions: None,
        }
    }

    /// `E`: encrypt one sector in place for thin slot `slot` (nothing in the patent profile;
    /// nothing for a sector of zeros with `keep_holes`).
    fn encrypt(&self, slot: u64, sector: &mut [u8]) {
        if let Some(c) = self.cipher {
            if !(self.keep_holes && is_zero(sector)) {
                c.encrypt(slot, sector);
            }
        }
    }

    /// `D`, the inverse of [`encrypt`](Self::encrypt). With `keep_holes`, a sealed sector of
    /// zeros is a hole: its ciphertext would be all zeros with probability `2^-(8 S)`.
    pub(crate) fn decrypt(&self, slot: u64, sector: &mut [u8]) {
        if let Some(c) = self.cipher {
            if !(self.keep_holes && is_zero(sector)) {
                c.decrypt(slot, sector);
            }
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
        "window" => Some(Box::new(Window::default())),
        _ => None,
    }
}

/// Names of every strategy, for help texts.
pub const STRATEGIES: &[&str] = &["window", "direct"];

/// Collects sectors for image positions 0, 1, 2, ... and writes them in 1 MiB runs,
/// hashing what it writes.
struct SequentialWriter<'a> {
    ctx: &'a PassCtx<'a>,
    image: &'a dyn Disk,
    buf: Vec<u8>,
    next: u64,
    hasher: PassHasher<'a>,
}

impl<'a> SequentialWriter<'a> {
    fn new(ctx: &'a PassCtx<'a>, image: &'a dyn Disk, hasher: PassHasher<'a>) -> Self {
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

/// What a pass hashes in image order: the image digest, and beside it (a plain pass of a
/// job that asked for it) the region digest tree.
pub(crate) struct PassHasher<'a> {
    image: ImageHasher,
    regions: Option<(&'a RegionTap, Option<RegionFeed>)>,
}

impl<'a> PassHasher<'a> {
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.image.update(bytes);
        if let Some((_, Some(feed))) = &mut self.regions {
            feed.update(bytes);
        }
    }

    pub(crate) fn update_zeros(&mut self, len: u64) {
        self.image.update_zeros(len);
        if let Some((_, Some(feed))) = &mut self.regions {
            feed.update_zeros(len);
        }
    }

    /// Splits off the region tree, for another thread to feed with the same bytes in the
    /// same order (each BLAKE3 hash then runs on its own core); the image digest stays.
    pub(crate) fn split_regions(self) -> (Self, Option<RegionHalf<'a>>) {
        let (tap, feed) = match self.regions {
            Some((tap, Some(feed))) => (tap, feed),
            regions => {
                let image = self.image;
                return (Self { image, regions }, None);
            }
        };
        let image = Self {
            image: self.image,
            regions: None,
        };
        (image, Some(RegionHalf { tap, feed }))
    }

    /// The image digest; the region hasher goes back to its tap, for the job to finish.
    pub(crate) fn finalize(self) -> blake3::Hash {
        if let Some((tap, Some(feed))) = self.regions {
            tap.put(feed);
        }
        self.image.finalize()
    }
}

/// The region tree of a plain pass split off its [`PassHasher`]: fed in image order by a
/// thread of its own, handed back to its tap only once fed the whole pass.
pub(crate) struct RegionHalf<'a> {
    tap: &'a RegionTap,
    feed: RegionFeed,
}

impl RegionHalf<'_> {
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.feed.update(bytes);
    }

    pub(crate) fn update_zeros(&mut self, len: u64) {
        self.feed.update_zeros(len);
    }

    /// Every byte of the pass was fed: the hasher goes back to its tap, for the job to
    /// finish. A half dropped without this (a pass that stopped) leaves the tap empty.
    pub(crate) fn finish(self) {
        self.tap.put(self.feed);
    }
}

/// The region hasher of a plain pass, fed in the original image's coordinates: a dense
/// seal's passes see the compacted image (its data extents end to end), so the holes
/// between the extents are fed as zeros.
pub(crate) struct RegionFeed {
    hasher: RegionHasher,
    /// Dense placement: the original's data extents (bytes, whole sectors), ascending.
    extents: Option<Vec<std::ops::Range<u64>>>,
    /// The extent being fed, and bytes of it fed so far.
    at: usize,
    into: u64,
    /// Bytes of the original fed so far.
    fed: u64,
}

impl RegionFeed {
    fn update(&mut self, mut bytes: &[u8]) {
        if self.extents.is_none() {
            self.hasher.update(bytes);
            return;
        }
        while !bytes.is_empty() {
            let Some(e) = self.extent() else {
                // Past the compacted image: the hasher counts it and `finish` refuses it.
                self.hasher.update(bytes);
                return;
            };
            if self.into == 0 && e.start > self.fed {
                self.hasher.update_zeros(e.start - self.fed);
                self.fed = e.start;
            }
            let room = e.end - e.start - self.into;
            let n = usize::try_from(room).map_or(bytes.len(), |r| r.min(bytes.len()));
            let (piece, rest) = bytes.split_at(n);
            self.hasher.update(piece);
            self.step(n as u64);
            bytes = rest;
        }
    }

    fn update_zeros(&mut self, mut len: u64) {
        if self.extents.is_none() {
            self.hasher.update_zeros(len);
            return;
        }
        while len > 0 {
            let Some(e) = self.extent() else {
                self.hasher.update_zeros(len);
                return;
            };
            if self.into == 0 && e.start > self.fed {
                self.hasher.update_zeros(e.start - self.fed);
                self.fed = e.start;
            }
            let n = (e.end - e.start - self.into).min(len);
            self.hasher.update_zeros(n);
            self.step(n);
            len -= n;
        }
    }

    /// The extent being fed, `None` past the last.
    fn extent(&self) -> Option<std::ops::Range<u64>> {
        self.extents.as_ref()?.get(self.at).cloned()
    }

    fn step(&mut self, n: u64) {
        self.into += n;
        self.fed += n;
        let done = self
            .extents
            .as_ref()
            .and_then(|x| x.get(self.at))
            .is_some_and(|e| self.into == e.end - e.start);
        if done {
            self.at += 1;
            self.into = 0;
        }
    }
}

/// Where a job hands a region hasher to a plain pass and takes it back, fed, when the
/// pass is over (the pass's threads own it meanwhile).
pub struct RegionTap {
    feed: std::sync::Mutex<Option<RegionFeed>>,
    image_bytes: u64,
}

impl RegionTap {
    /// A tap for the tree of an image cut as `layout`, keyed by `keys`; with `extents`
    /// (dense placement) the pass sees the compacted image of those extents.
    pub fn new(
        layout: RegionLayout,
        keys: RegionKeys,
        extents: Option<Vec<std::ops::Range<u64>>>,
    ) -> Self {
        Self {
            feed: std::sync::Mutex::new(Some(RegionFeed {
                hasher: RegionHasher::new(layout, keys),
                extents,
                at: 0,
                into: 0,
                fed: 0,
            })),
            image_bytes: layout.image_bytes(),
        }
    }

    fn take(&self) -> Option<RegionFeed> {
        self.feed.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn put(&self, feed: RegionFeed) {
        *self.feed.lock().unwrap_or_else(|p| p.into_inner()) = Some(feed);
    }

    /// The tree and its root, once a pass fed every byte of the image; `None` if no pass
    /// handed the hasher back or it was fed another length than the image's.
    pub fn finish(self) -> Option<(RegionTree, [u8; 32])> {
        let mut feed = self.feed.into_inner().unwrap_or_else(|p| p.into_inner())?;
        // The original's hole after its last extent.
        if feed.extents.is_some() && feed.fed < self.image_bytes {
            feed.hasher.update_zeros(self.image_bytes - feed.fed);
        }
        feed.hasher.finish().ok()
    }
}
