//! Image digests: what the seal record's `plain_digest` and `sealed_digest` are.
//!
//! Two schemes, named in the record's `digest` field:
//!
//! - `blake3` (records of version 1): BLAKE3 of the whole image. Hashing a 64 GiB image that
//!   holds 1 GiB of data hashes 63 GiB of zeros, so it is kept only to read old records.
//! - `blake3-64k` (the default since record version 2): the image is cut into blocks of
//!   64 KiB (the last one may be shorter); each block gives a 32-byte leaf, **all zeros for a
//!   block of zeros** and its BLAKE3 otherwise; the digest is BLAKE3 of the leaves in order
//!   followed by the image's length as 8 little-endian bytes. A hole (a range the file
//!   system reports as unallocated, or any run of zero bytes) is hashed without being read:
//!   [`ImageHasher::update_zeros`] costs 32 bytes of hashing per 64 KiB.
//!
//! Leaves and root use BLAKE3 in keyed mode with keys derived (`blake3::derive_key`) from
//! the digest key of the secure profile, or from no key at all in the patent profile, under
//! distinct contexts, so a leaf can never be mistaken for a root. A real block's leaf is all
//! zeros with probability `2^-256`.

use std::fmt;

/// Bytes per leaf block of `blake3-64k`.
pub const BLOCK_BYTES: u64 = 64 << 10;

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

enum Inner {
    // Boxed, both: hashers are large and move between the threads of a pass.
    Whole(Box<blake3::Hasher>),
    Blocks(Box<Blocks>),
}

struct Blocks {
    leaf_key: [u8; 32],
    root: blake3::Hasher,
    /// The current block's hasher, once it has seen a byte that is not zero.
    leaf: Option<blake3::Hasher>,
    /// Bytes of the current block seen so far.
    filled: u64,
    /// Bytes seen in all.
    total: u64,
}

static ZEROS: [u8; BLOCK_BYTES as usize] = [0; BLOCK_BYTES as usize];

impl ImageHasher {
    /// A hasher for `scheme`, keyed by the secure profile's digest key if given.
    pub fn new(scheme: DigestScheme, key: Option<&[u8; 32]>) -> Self {
        let inner = match scheme {
            DigestScheme::Whole => Inner::Whole(Box::new(match key {
                Some(k) => blake3::Hasher::new_keyed(k),
                None => blake3::Hasher::new(),
            })),
            DigestScheme::Blocks64k => {
                let material: &[u8] = key.map_or(&[], |k| k.as_slice());
                Inner::Blocks(Box::new(Blocks {
                    leaf_key: blake3::derive_key(LEAF_CONTEXT, material),
                    root: blake3::Hasher::new_keyed(&blake3::derive_key(ROOT_CONTEXT, material)),
                    leaf: None,
                    filled: 0,
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
            let room = (BLOCK_BYTES - self.filled) as usize;
            let (part, rest) = bytes.split_at(room.min(bytes.len()));
            match &mut self.leaf {
                Some(h) => {
                    h.update(part);
                }
                None if is_zero(part) => {}
                None => {
                    let mut h = blake3::Hasher::new_keyed(&self.leaf_key);
                    h.update(&ZEROS[..self.filled as usize]);
                    h.update(part);
                    self.leaf = Some(h);
                }
            }
            self.advance(part.len() as u64);
            bytes = rest;
        }
    }

    fn update_zeros(&mut self, mut len: u64) {
        // Finish the current block, then whole blocks of zeros cost one leaf each.
        while len > 0 && self.filled > 0 {
            let n = len.min(BLOCK_BYTES - self.filled);
            if let Some(h) = &mut self.leaf {
                h.update(&ZEROS[..n as usize]);
            }
            self.advance(n);
            len -= n;
        }
        let whole = len / BLOCK_BYTES;
        for _ in 0..whole {
            self.root.update(&[0u8; 32]);
        }
        self.total += whole * BLOCK_BYTES;
        let tail = len % BLOCK_BYTES;
        if tail > 0 {
            self.advance(tail);
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
        let leaf = self
            .leaf
            .take()
            .map_or([0u8; 32], |h| *h.finalize().as_bytes());
        self.root.update(&leaf);
        self.filled = 0;
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
            } else {
                root.update(blake3::keyed_hash(&leaf_key, block).as_bytes());
            }
        }
        root.update(&(image.len() as u64).to_le_bytes());
        root.finalize()
    }

    /// An image of `len` bytes with data in `[a, b)` (a counter pattern) and zeros elsewhere.
    fn image(len: usize, a: usize, b: usize) -> Vec<u8> {
        (0..len)
            .map(|o| {
                if (a..b).contains(&o) {
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
        let img = image(200_000, 1000, 150_000);
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
        ) {
            let a = a.min(len);
            let b = (a + span).min(len);
            let img = image(len, a, b);
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

    #[test]
    fn scheme_names_round_trip() {
        for s in [DigestScheme::Whole, DigestScheme::Blocks64k] {
            assert_eq!(DigestScheme::from_name(s.name()), Some(s));
        }
        assert_eq!(DigestScheme::from_name("md5"), None);
    }
}
