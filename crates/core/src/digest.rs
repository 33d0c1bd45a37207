//! Image digests: what the seal record's `plain_digest` and `sealed_digest` are.
//!
//! Two schemes, named in the record's `digest` field:
//!
//! - `blake3` (records of version 1): BLAKE3 of the whole image. Hashing a 64 GiB image that
//!   holds 1 GiB of data hashes 63 GiB of zeros, so it is kept only to read old records.
//! - `blake3-64k` (the default since record version 2): the image is cut into blocks of
//!   64 KiB and each block into 16 pages of 4 KiB (the image's last block and page may be
//!   shorter). A block whose pages are all zeros gives a leaf of 32 zero bytes; any other
//!   block gives BLAKE3 of **its pages that are not all zeros**, in order, followed by a
//!   16-bit little-endian bitmap of which pages those are (bit `p` for page `p`). The
//!   digest is BLAKE3 of the leaves in order followed by the image's length as 8
//!   little-endian bytes. Zeros are hashed without being read: a hole costs 32 bytes of
//!   hashing per 64 KiB ([`ImageHasher::update_zeros`]), and a sealed sparse image, whose
//!   data is spread over many blocks, costs the pages that hold data, not the blocks. The
//!   page count and the bitmap make the encoding unambiguous: every page but the image's
//!   last is 4 KiB.
//!
//! Leaves and root use BLAKE3 in keyed mode with keys derived (`blake3::derive_key`) from
//! the digest key of the secure profile, or from no key at all in the patent profile, under
//! distinct contexts, so a leaf can never be mistaken for a root. A real block's leaf is all
//! zeros with probability `2^-256`.

use std::{fmt, mem};

use zeroize::Zeroizing;

/// Bytes per leaf block of `blake3-64k`.
pub const BLOCK_BYTES: u64 = 64 << 10;
/// Bytes per page of a block: zero pages are left out of a block's leaf.
pub const PAGE_BYTES: u64 = 4 << 10;

const LEAF_CONTEXT: &str = "pdguard 2026-11 image digest blake3-64k leaf";
const ROOT_CONTEXT: &str = "pdguard 2026-11 image digest blake3-64k root";

/// How a record's digests are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestScheme {
    /// `blake3`: the whole image, every byte (record version 1).
    Whole,
    /// `blake3-64k`: a list of 64 KiB leaves, zero blocks free (record version 2).
    Blocks64k,
}

impl DigestScheme {
    /// The scheme of new records.
    pub const DEFAULT: Self = Self::Blocks64k;

    pub fn name(self) -> &'static str {
        match self {
            Self::Whole => "blake3",
            Self::Blocks64k => "blake3-64k",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "blake3" => Some(Self::Whole),
            "blake3-64k" => Some(Self::Blocks64k),
            _ => None,
        }
    }
}

impl fmt::Display for DigestScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// True when every byte of `bytes` is zero. Vectorised: OR-folds 256 bytes at a time and
/// stops at the first block that is not zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(256);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Hashes an image fed in order, in pieces of any size, data or known zeros.
pub struct ImageHasher {
    inner: Inner,
}

/// A BLAKE3 hasher whose state (which holds its key in keyed mode) is wiped when dropped.
struct Wiped(blake3::Hasher);

impl std::ops::Deref for Wiped {
    type Target = blake3::Hasher;
    fn deref(&self) -> &blake3::Hasher {
        &self.0
    }
}

impl std::ops::DerefMut for Wiped {
    fn deref_mut(&mut self) -> &mut blake3::Hasher {
        &mut self.0
    }
}

impl Drop for Wiped {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

enum Inner {
    // Boxed, both: hashers are large and move between the threads of a pass.
    Whole(Box<Wiped>),
    Blocks(Box<Blocks>),
}

struct Blocks {
    /// Wiped when dropped (derived from the secure profile's digest key).
    leaf_key: Zeroizing<[u8; 32]>,
    root: Wiped,
    /// The current block's hasher, once it has seen a page that is not all zeros.
    leaf: Option<Wiped>,
    /// Pages of the current block that are not all zeros.
    bitmap: u16,
    /// Bytes of the current block seen so far.
    filled: u64,
    /// A page seen in part (input not aligned on pages).
    partial: Vec<u8>,
    /// Bytes seen in all.
    total: u64,
}

static ZEROS: [u8; BLOCK_BYTES as usize] = [0; BLOCK_BYTES as usize];

impl ImageHasher {
    /// A hasher for `scheme`, keyed by the secure profile's digest key if given.
    pub fn new(scheme: DigestScheme, key: Option<&[u8; 32]>) -> Self {
        let inner = match scheme {
            DigestScheme::Whole => Inner::Whole(Box::new(Wiped(match key {
                Some(k) => blake3::Hasher::new_keyed(k),
                None => blake3::Hasher::new(),
            }))),
            DigestScheme::Blocks64k => {
                let material: &[u8] = key.map_or(&[], |k| k.as_slice());
                Inner::Blocks(Box::new(Blocks {
                    leaf_key: Zeroizing::new(blake3::derive_key(LEAF_CONTEXT, material)),
                    root: Wiped(blake3::Hasher::new_keyed(&Zeroizing::new(
                        blake3::derive_key(ROOT_CONTEXT, material),
                    ))),
                    leaf: None,
                    bitmap: 0,
                    filled: 0,
                    partial: Vec::new(),
                    total: 0,
                }))
            }
        };
        Self { inner }
    }

    /// The next `bytes` of the image.
    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.inner {
            Inner::Whole(h) => {
                h.update(bytes);
            }
            Inner::Blocks(b) => b.update(bytes),
        }
    }

    /// The next `len` bytes of the image are zeros (a hole): hashed without a buffer.
    pub fn update_zeros(&mut self, len: u64) {
        match &mut self.inner {
            Inner::Whole(h) => {
                let mut left = len;
                while left > 0 {
                    let n = left.min(BLOCK_BYTES);
                    h.update(&ZEROS[..n as usize]);
                    left -= n;
                }
            }
            Inner::Blocks(b) => b.update_zeros(len),
        }
    }

    pub fn finalize(self) -> blake3::Hash {
        match self.inner {
            Inner::Whole(h) => h.finalize(),
            Inner::Blocks(b) => {
                let mut b = *b;
                if !b.partial.is_empty() {
                    let page = mem::take(&mut b.partial);
                    b.pages(&page);
                }
                if b.filled > 0 {
                    b.end_block();
                }
                b.root.update(&b.total.to_le_bytes());
                b.root.finalize()
            }
        }
    }
}

impl Blocks {
    fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if !self.partial.is_empty() || bytes.len() < PAGE_BYTES as usize {
                // Assemble a page from pieces.
                let room = PAGE_BYTES as usize - self.partial.len();
                let (part, rest) = bytes.split_at(room.min(bytes.len()));
                self.partial.extend_from_slice(part);
                if self.partial.len() == PAGE_BYTES as usize {
                    let page = mem::take(&mut self.partial);
                    self.pages(&page);
                    self.partial = page;
                    self.partial.clear();
                }
                bytes = rest;
                continue;
            }
            // Whole pages, up to the end of the block.
            let room = (BLOCK_BYTES - self.filled) as usize;
            let n = room.min(bytes.len()) / PAGE_BYTES as usize * PAGE_BYTES as usize;
            let (pages, rest) = bytes.split_at(n);
            self.pages(pages);
            bytes = rest;
        }
    }

    /// Whole pages (the last one may be the image's short last page) inside one block,
    /// starting on a page boundary: runs of pages that are not all zeros are hashed with one
    /// call each, so that dense data is hashed in large pieces.
    fn pages(&mut self, bytes: &[u8]) {
        let mut run: Option<usize> = None;
        for (k, page) in bytes.chunks(PAGE_BYTES as usize).enumerate() {
            let index = (self.filled / PAGE_BYTES) as usize + k;
            if is_zero(page) {
                if let Some(start) = run.take() {
                    self.hash(&bytes[start..k * PAGE_BYTES as usize]);
                }
            } else {
                self.bitmap |= 1 << index;
                run.get_or_insert(k * PAGE_BYTES as usize);
            }
        }
        if let Some(start) = run {
            self.hash(&bytes[start..]);
        }
        self.advance(bytes.len() as u64);
    }

    fn hash(&mut self, bytes: &[u8]) {
        let key = &self.leaf_key;
        self.leaf
            .get_or_insert_with(|| Wiped(blake3::Hasher::new_keyed(key)))
            .update(bytes);
    }

    fn update_zeros(&mut self, mut len: u64) {
        // Zeros that complete a partial page are bytes like any other.
        if !self.partial.is_empty() {
            let n = len.min(PAGE_BYTES - self.partial.len() as u64);
            self.update(&ZEROS[..n as usize]);
            len -= n;
        }
        // Now on a page boundary: zero pages cost nothing but their length, up to the end
        // of the block; then zero blocks one leaf each; then pages again; then a part page.
        while len >= PAGE_BYTES && self.filled > 0 {
            let n = (BLOCK_BYTES - self.filled).min(len / PAGE_BYTES * PAGE_BYTES);
            self.advance(n);
            len -= n;
        }
        if self.filled == 0 {
            let whole = len / BLOCK_BYTES;
            for _ in 0..whole {
                self.root.update(&[0u8; 32]);
            }
            self.total += whole * BLOCK_BYTES;
            len -= whole * BLOCK_BYTES;
        }
        let pages = len / PAGE_BYTES * PAGE_BYTES;
        if pages > 0 {
            self.advance(pages);
            len -= pages;
        }
        if len > 0 {
            self.update(&ZEROS[..len as usize]);
        }
    }

    fn advance(&mut self, n: u64) {
        self.filled += n;
        self.total += n;
        if self.filled == BLOCK_BYTES {
            self.end_block();
        }
    }

    fn end_block(&mut self) {
        let leaf = match self.leaf.take() {
            Some(mut h) => {
                h.update(&self.bitmap.to_le_bytes());
                *h.finalize().as_bytes()
            }
            None => [0u8; 32],
        };
        self.root.update(&leaf);
        self.filled = 0;
        self.bitmap = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The scheme written out literally, for comparison.
    fn reference(image: &[u8], key: Option<&[u8; 32]>) -> blake3::Hash {
        let material: &[u8] = key.map_or(&[], |k| k.as_slice());
        let leaf_key = blake3::derive_key(LEAF_CONTEXT, material);
        let mut root = blake3::Hasher::new_keyed(&blake3::derive_key(ROOT_CONTEXT, material));
        for block in image.chunks(BLOCK_BYTES as usize) {
            if block.iter().all(|&b| b == 0) {
                root.update(&[0u8; 32]);
                continue;
            }
            let mut leaf = blake3::Hasher::new_keyed(&leaf_key);
            let mut bitmap = 0u16;
            for (p, page) in block.chunks(PAGE_BYTES as usize).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    leaf.update(page);
                    bitmap |= 1 << p;
                }
            }
            leaf.update(&bitmap.to_le_bytes());
            root.update(leaf.finalize().as_bytes());
        }
        root.update(&(image.len() as u64).to_le_bytes());
        root.finalize()
    }

    /// An image of `len` bytes with data in `[a, b)` (a counter pattern) and zeros elsewhere;
    /// `speckled`: only one 512-byte sector in 11 of `[a, b)` holds data, so that blocks
    /// hold both zero pages and data pages.
    fn image(len: usize, a: usize, b: usize, speckled: bool) -> Vec<u8> {
        (0..len)
            .map(|o| {
                let data = (a..b).contains(&o) && (!speckled || (o / 512) % 11 == 0);
                if data {
                    (o % 251 + 1) as u8
                } else {
                    0
                }
            })
            .collect()
    }

    #[test]
    fn is_zero_finds_one_set_bit_anywhere() {
        let mut v = vec![0u8; 1000];
        assert!(is_zero(&v));
        assert!(is_zero(&[]));
        for at in [0, 255, 256, 511, 999] {
            v[at] = 0x10;
            assert!(!is_zero(&v), "byte {at}");
            v[at] = 0;
        }
    }

    #[test]
    fn the_whole_scheme_is_plain_blake3() {
        let img = image(200_000, 1000, 150_000, false);
        let mut h = ImageHasher::new(DigestScheme::Whole, None);
        h.update(&img[..1000]);
        h.update_zeros(0);
        h.update(&img[1000..]);
        assert_eq!(h.finalize(), blake3::hash(&img));
        let key = [7u8; 32];
        let mut h = ImageHasher::new(DigestScheme::Whole, Some(&key));
        h.update(&img[..150_000]);
        h.update_zeros(50_000);
        assert_eq!(h.finalize(), blake3::keyed_hash(&key, &img));
    }

    #[test]
    fn zero_blocks_and_data_blocks_give_different_digests() {
        let len = 3 * BLOCK_BYTES as usize;
        let zeros = vec![0u8; len];
        let mut one = zeros.clone();
        one[len - 1] = 1;
        let d = |img: &[u8]| {
            let mut h = ImageHasher::new(DigestScheme::Blocks64k, None);
            h.update(img);
            h.finalize()
        };
        assert_ne!(d(&zeros), d(&one));
        // The length is part of the digest: one more zero block changes it.
        assert_ne!(d(&zeros), d(&zeros[..len - 512]));
        // So is the key.
        let mut keyed = ImageHasher::new(DigestScheme::Blocks64k, Some(&[1; 32]));
        keyed.update(&zeros);
        assert_ne!(keyed.finalize(), d(&zeros));
    }

    proptest! {
        /// However the image is cut into data pieces and zero runs, the digest is the one of
        /// the reference definition.
        #[test]
        fn blocks_digest_matches_the_reference_for_any_split(
            len in 0usize..400_000,
            a in 0usize..400_000,
            span in 0usize..200_000,
            cuts in proptest::collection::vec(0usize..400_000, 0..12),
            keyed in any::<bool>(),
            speckled in any::<bool>(),
        ) {
            let a = a.min(len);
            let b = (a + span).min(len);
            let img = image(len, a, b, speckled);
            let key = keyed.then_some([9u8; 32]);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(len)).collect();
            cuts.push(0);
            cuts.push(len);
            cuts.sort_unstable();
            let mut h = ImageHasher::new(DigestScheme::Blocks64k, key.as_ref());
            for w in cuts.windows(2) {
                let piece = &img[w[0]..w[1]];
                if is_zero(piece) && w[0] % 3 == 0 {
                    h.update_zeros(piece.len() as u64);
                } else {
                    h.update(piece);
                }
            }
            prop_assert_eq!(h.finalize(), reference(&img, key.as_ref()));
        }
    }

    /// Pinned: a change here makes every sealed record's digests wrong.
    #[test]
    fn blocks_digest_is_pinned() {
        let img = image(300_000, 5_000, 200_000, true);
        let mut h = ImageHasher::new(DigestScheme::Blocks64k, None);
        h.update(&img);
        assert_eq!(h.finalize(), reference(&img, None));
        assert_eq!(
            reference(&img, None).to_hex().as_str(),
            PINNED_BLOCKS_DIGEST
        );
    }

    const PINNED_BLOCKS_DIGEST: &str =
        "343f5ce6f34a1d72aebecb6ad7f21145f8472c965c88ba3524c7d01c8564e41f";

    #[test]
    fn scheme_names_round_trip() {
        for s in [DigestScheme::Whole, DigestScheme::Blocks64k] {
            assert_eq!(DigestScheme::from_name(s.name()), Some(s));
        }
        assert_eq!(DigestScheme::from_name("md5"), None);
    }
}
