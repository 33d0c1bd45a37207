//! [`ExtentView`]: a disk made of some byte ranges of another, end to end. Dense placement
//! (`jobs/dense.rs`) seals the **compacted image** (the original's data ranges, in order)
//! and writes the sealed data to the image's first `D` sectors (a one-extent view).

use std::ops::Range;

use super::{DataMap, Disk, Result, StoreError};

/// The extents of `inner`, in order, seen as one disk.
pub struct ExtentView<'a> {
    inner: &'a dyn Disk,
    extents: Vec<Range<u64>>,
    /// `starts[k]`: offset in the view of extent `k`; one more entry, the view's length.
    starts: Vec<u64>,
    /// Report the whole view as data (so that a [`Sparse`](super::Sparse) pass writes every
    /// byte, zeros included), instead of `inner`'s holes.
    all_data: bool,
}

impl<'a> ExtentView<'a> {
    /// `extents` must be ascending, disjoint and inside `inner`.
    pub fn new(inner: &'a dyn Disk, extents: Vec<Range<u64>>, all_data: bool) -> Self {
        let mut starts = Vec::with_capacity(extents.len() + 1);
        let mut at = 0;
        for e in &extents {
            starts.push(at);
            at += e.end - e.start;
        }
        starts.push(at);
        debug_assert!(extents.windows(2).all(|w| w[0].end <= w[1].start));
        debug_assert!(extents.last().iter().all(|e| e.end <= inner.len()));
        Self {
            inner,
            extents,
            starts,
            all_data,
        }
    }

    /// The first `len` bytes of `inner`, with its holes.
    pub fn prefix(inner: &'a dyn Disk, len: u64) -> Self {
        Self::new(inner, std::iter::once(0..len).collect(), false)
    }

    /// `[offset, offset + len)` of the view as pieces of `inner`: `(view offset, inner
    /// range)`, in order. Past the end is an error.
    fn pieces(&self, offset: u64, len: u64) -> Result<Vec<(u64, Range<u64>)>> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.len())
            .ok_or_else(|| {
                StoreError::io(
                    "access",
                    format!("a view of {} bytes at byte {offset}", self.len()),
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                )
            })?;
        let mut k = self
            .starts
            .partition_point(|&s| s <= offset)
            .saturating_sub(1);
        let mut at = offset;
        let mut out = Vec::new();
        while at < end {
            let (start, e) = (self.starts[k], &self.extents[k]);
            let n = (e.end - e.start - (at - start)).min(end - at);
            let from = e.start + (at - start);
            out.push((at, from..from + n));
            at += n;
            k += 1;
        }
        Ok(out)
    }
}

impl Disk for ExtentView<'_> {
    fn len(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        for (at, r) in self.pieces(offset, buf.len() as u64)? {
            let i = (at - offset) as usize;
            self.inner
                .read_at(&mut buf[i..i + (r.end - r.start) as usize], r.start)?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        for (at, r) in self.pieces(offset, buf.len() as u64)? {
            let i = (at - offset) as usize;
            self.inner
                .write_at(&buf[i..i + (r.end - r.start) as usize], r.start)?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    fn release(&self, offset: u64, len: u64) {
        let len = len.min(self.len().saturating_sub(offset));
        if let Ok(pieces) = self.pieces(offset, len) {
            for (_, r) in pieces {
                self.inner.release(r.start, r.end - r.start);
            }
        }
    }

    fn data_map(&self) -> Result<DataMap> {
        if self.all_data {
            return Ok(DataMap::full(self.len()));
        }
        let map = self.inner.data_map()?;
        let mut ranges = Vec::new();
        for (e, &start) in self.extents.iter().zip(&self.starts) {
            for (r, data) in map.pieces(e.start, e.end - e.start) {
                if data {
                    ranges.push(start + (r.start - e.start)..start + (r.end - e.start));
                }
            }
        }
        Ok(DataMap::from_ranges(self.len(), ranges))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::sim::SimStorage;
    use crate::store::Storage;

    #[test]
    fn a_view_reads_and_writes_its_extents_end_to_end() {
        let img: Vec<u8> = (0..64u32 * 512).map(|i| (i / 512) as u8 + 1).collect();
        let st = SimStorage::new(img.clone());
        let disk = st.open_image(true).unwrap();
        let v = ExtentView::new(&*disk, vec![512..1536, 8192..8704, 20480..21504], true);
        assert_eq!(v.len(), 2560);
        let mut got = vec![0u8; 1024];
        v.read_at(&mut got, 768).unwrap();
        // 256 bytes of sector 2, then sector 16, then 256 bytes of sector 40.
        assert!(got[..256].iter().all(|&b| b == 3));
        assert!(got[256..768].iter().all(|&b| b == 17));
        assert!(got[768..].iter().all(|&b| b == 41));
        v.write_at(&[0xaa; 1024], 768).unwrap();
        let after = st.image();
        assert!(after[1280..1536].iter().all(|&b| b == 0xaa));
        assert!(after[8192..8704].iter().all(|&b| b == 0xaa));
        assert!(after[20480..20736].iter().all(|&b| b == 0xaa));
        assert_eq!(after[20736], 41);
        assert_eq!(after[1279], 3);
        assert!(v.read_at(&mut got, 2000).is_err(), "past the end");
        assert_eq!(v.data_map().unwrap(), DataMap::full(2560));
    }

    #[test]
    fn a_prefix_shows_the_holes_of_its_disk() {
        let mut img = vec![0u8; 16 * 4096];
        img[4096] = 1;
        img[3 * 4096 + 5] = 1;
        let st = SimStorage::new(img);
        let disk = st.open_image(true).unwrap();
        let v = ExtentView::prefix(&*disk, 2 * 4096);
        assert_eq!(
            v.data_map().unwrap(),
            DataMap::from_ranges(8192, [4096..8192, 4096..8192])
        );
    }
}
