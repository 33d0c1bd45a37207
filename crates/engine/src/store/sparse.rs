//! Holes: which bytes of a disk hold data ([`DataMap`]), and [`Sparse`], a disk that does
//! not read its holes and does not write zeros into them.
//!
//! The rule that keeps every strategy byte-identical: **a run of zeros is never written over
//! a hole**, because the hole already reads as zeros. Everything else is written, so data
//! ranges are always overwritten in place (DESIGN.md §3: deallocating is not wiping; a
//! sealed disk overwrites what the original held, and leaves holes only where the original
//! had them). Whether a sector is skipped depends on its bytes and on the map taken when the
//! pass started, never on timing, so a resumed pass writes the same bytes.

use std::ops::Range;

use super::{Disk, Result};

/// The byte ranges of a disk that may hold data: ascending, disjoint, not touching. The rest
/// is holes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataMap {
    len: u64,
    data: Vec<Range<u64>>,
}

impl DataMap {
    /// Every byte is data.
    pub fn full(len: u64) -> Self {
        Self::from_ranges(len, std::iter::once(0..len))
    }

    /// From ranges in any order, overlapping or not; clipped to `len`, sorted and merged.
    pub fn from_ranges(len: u64, ranges: impl IntoIterator<Item = Range<u64>>) -> Self {
        let mut v: Vec<Range<u64>> = ranges
            .into_iter()
            .map(|r| r.start.min(len)..r.end.min(len))
            .filter(|r| r.start < r.end)
            .collect();
        v.sort_unstable_by_key(|r| r.start);
        let mut data: Vec<Range<u64>> = Vec::with_capacity(v.len());
        for r in v {
            match data.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => data.push(r),
            }
        }
        Self { len, data }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The data ranges, ascending.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.data
    }

    /// Bytes in data ranges.
    pub fn data_bytes(&self) -> u64 {
        self.data.iter().map(|r| r.end - r.start).sum()
    }

    /// True when all of `[offset, offset + len)` is a hole.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.pieces(offset, len).all(|(_, data)| !data)
    }

    /// `[offset, offset + len)` cut at the map's boundaries, in order: `(range, is_data)`.
    pub fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (Range<u64>, bool)> + '_ {
        let end = offset.saturating_add(len);
        // The first data range that ends after `offset`.
        let mut k = self.data.partition_point(|r| r.end <= offset);
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let piece = match self.data.get(k) {
                Some(r) if r.start <= at => {
                    k += 1;
                    (at..r.end.min(end), true)
                }
                Some(r) => (at..r.start.min(end), false),
                None => (at..end, false),
            };
            at = piece.0.end;
            Some(piece)
        })
    }
}

/// A disk seen through the [`DataMap`] it had when this wrapper was made: holes are read as
/// zeros without I/O, and zeros are not written into holes (see the module docs). The map is
/// not updated by writes: a pass writes each place at most once, so a place it has not
/// written is still what the map says.
pub struct Sparse<'a> {
    inner: &'a dyn Disk,
    map: DataMap,
    /// Granularity of the zero test when writing into a hole: the sector size, at least a
    /// page (a file system allocates whole blocks, so writing a page's zeros with its data
    /// costs nothing and saves system calls).
    grain: u64,
}

/// A file system block or memory page: the least a file system allocates.
const PAGE: u64 = 4096;

impl<'a> Sparse<'a> {
    pub fn new(inner: &'a dyn Disk, grain: u64) -> Result<Self> {
        Ok(Self {
            map: inner.data_map()?,
            inner,
            grain: grain.max(PAGE),
        })
    }

    pub fn map(&self) -> &DataMap {
        &self.map
    }

    /// Write the parts of `buf` (which lies at `offset`, inside a hole) that are not zeros,
    /// in runs of whole grains.
    fn write_into_hole(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut run: Option<u64> = None;
        let mut at = offset;
        let end = offset + buf.len() as u64;
        while at < end {
            let next = ((at / self.grain + 1) * self.grain).min(end);
            let part = &buf[(at - offset) as usize..(next - offset) as usize];
            if pdguard_core::digest::is_zero(part) {
                if let Some(start) = run.take() {
                    self.write_run(buf, offset, start, at)?;
                }
            } else if run.is_none() {
                run = Some(at);
            }
            at = next;
        }
        if let Some(start) = run {
            self.write_run(buf, offset, start, end)?;
        }
        Ok(())
    }

    fn write_run(&self, buf: &[u8], offset: u64, start: u64, end: u64) -> Result<()> {
        let part = &buf[(start - offset) as usize..(end - offset) as usize];
        self.inner.write_at(part, start)
    }
}

impl Disk for Sparse<'_> {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        for (r, data) in self.map.pieces(offset, buf.len() as u64) {
            let part = &mut buf[(r.start - offset) as usize..(r.end - offset) as usize];
            if data {
                self.inner.read_at(part, r.start)?;
            } else {
                part.fill(0);
            }
        }
        // Past the end: let the disk report it as it would.
        let covered = self.map.len().saturating_sub(offset).min(buf.len() as u64);
        if covered < buf.len() as u64 {
            let tail = offset + covered;
            self.inner.read_at(&mut buf[covered as usize..], tail)?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let covered = self.map.len().saturating_sub(offset).min(buf.len() as u64);
        for (r, data) in self.map.pieces(offset, covered) {
            let part = &buf[(r.start - offset) as usize..(r.end - offset) as usize];
            if data {
                self.inner.write_at(part, r.start)?;
            } else {
                self.write_into_hole(part, r.start)?;
            }
        }
        if covered < buf.len() as u64 {
            self.inner
                .write_at(&buf[covered as usize..], offset + covered)?;
        }
        Ok(())
    }

    fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        let covered = self.map.len().saturating_sub(offset).min(len);
        for (r, data) in self.map.pieces(offset, covered) {
            if data {
                self.inner.write_zeros(r.start, r.end - r.start)?;
            }
        }
        if covered < len {
            self.inner.write_zeros(offset + covered, len - covered)?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    fn release(&self, offset: u64, len: u64) {
        self.inner.release(offset, len);
    }

    fn data_map(&self) -> Result<DataMap> {
        Ok(self.map.clone())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::sim::SimStorage;
    use crate::store::Storage;
    use proptest::prelude::*;

    #[test]
    fn from_ranges_sorts_merges_and_clips() {
        let m = DataMap::from_ranges(100, [50..60, 0..10, 5..20, 20..30, 90..200, 70..70]);
        assert_eq!(m.ranges(), &[0..30, 50..60, 90..100]);
        assert_eq!(m.data_bytes(), 50);
        assert!(m.is_hole(30, 20));
        assert!(!m.is_hole(29, 2));
        assert!(DataMap::full(0).ranges().is_empty());
    }

    #[test]
    fn pieces_cover_the_range_in_order() {
        let m = DataMap::from_ranges(100, [10..20, 40..50]);
        let got: Vec<_> = m.pieces(15, 30).collect();
        assert_eq!(got, vec![(15..20, true), (20..40, false), (40..45, true)]);
        let got: Vec<_> = m.pieces(0, 100).collect();
        assert_eq!(got.len(), 5);
        assert_eq!(m.pieces(60, 0).count(), 0);
    }

    proptest! {
        /// Whatever the map, a Sparse disk reads what the disk holds and leaves it holding
        /// what was written, as long as its holes really read as zeros.
        #[test]
        fn sparse_disk_reads_and_writes_like_the_disk(
            data in proptest::collection::vec((0u64..64, 1u64..8), 0..6),
            start in 0u64..8,
            writes in proptest::collection::vec((1u64..5, 0u8..3, 0u64..3), 1..10),
        ) {
            let (len, grain) = (64 * 512u64, 512u64);
            // An image with data (a pattern) in some 512-byte sectors and zeros elsewhere.
            let mut img = vec![0u8; len as usize];
            let ranges: Vec<_> = data.iter().map(|&(a, n)| a * 512..(a + n) * 512).collect();
            for r in &ranges {
                for o in r.clone().take_while(|&o| o < len) {
                    img[o as usize] = (o % 13 + 1) as u8;
                }
            }
            let st = SimStorage::new(img.clone());
            let disk = st.open_image(true).unwrap();
            let sparse = Sparse::new(&*disk, grain).unwrap();
            let mut got = vec![0u8; len as usize];
            sparse.read_at(&mut got, 0).unwrap();
            prop_assert_eq!(&got, &img);
            // Writes to places not written before (as in a pass), with gaps between them.
            let mut want = img.clone();
            let mut at = start;
            for &(n, kind, gap) in &writes {
                if at >= 64 {
                    break;
                }
                let (off, n) = (at * 512, n.min(64 - at) * 512);
                // Zeros, a pattern, or zeros with one byte set.
                let mut buf = vec![if kind == 1 { 7u8 } else { 0 }; n as usize];
                if kind == 2 { buf[n as usize / 2] = 9; }
                sparse.write_at(&buf, off).unwrap();
                want[off as usize..(off + n) as usize].copy_from_slice(&buf);
                at += n / 512 + gap;
            }
            prop_assert_eq!(st.image(), want);
        }
    }
}
