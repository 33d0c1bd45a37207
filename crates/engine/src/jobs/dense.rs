//! Dense placement (record version 4): a `keep_holes` seal places only the sectors of the
//! original's data ranges, so its sealed data is the image's first `D` sectors, written
//! sequentially, and the rest stays holes (docs/on-disk-layout.md, "Dense placement").
//!
//! The passes are the usual ones on two views of the image: the **compacted image** (its
//! data ranges end to end, `D` sectors; read by the seal's scatter, written by the unseal's
//! gather) and the **dense region** (the image's first `D` sectors; written by the seal's
//! gather, read by the unseal's scatter). Around them:
//! - after the seal's gather, [`wipe_tail`]: every allocated range past the dense region
//!   (what the original held there) is overwritten with zeros, synced, then deallocated;
//! - after the unseal's gather, [`restore_holes`]: the original's holes are deallocated
//!   again (they held sealed data), so its allocation map comes back exactly.
//!
//! Both are idempotent, so a crash in either is finished by running the pass again.

use std::ops::Range;

use pdguard_core::dense::{DataRanges, MAX_DENSE_RANGES};

use crate::store::{Disk, ExtentView, Result, StoreError};

/// The original's data map, and what the passes derive from it.
pub struct Dense {
    pub ranges: DataRanges,
    /// The ranges rounded out to whole sectors: the compacted image's extents.
    pub extents: Vec<Range<u64>>,
    /// `D`.
    pub sectors: u64,
}

impl Dense {
    pub fn new(ranges: DataRanges, sector: u64) -> Self {
        Self {
            extents: ranges.sector_extents(sector),
            sectors: ranges.sectors(sector),
            ranges,
        }
    }

    /// The compacted image: every byte reported as data, so that the unseal's gather
    /// writes zeros too and the original's data ranges come back allocated.
    pub fn compacted<'a>(&self, image: &'a dyn Disk) -> ExtentView<'a> {
        ExtentView::new(image, self.extents.clone(), true)
    }

    /// The dense region: the first `D` sectors, with the image's holes.
    pub fn region<'a>(&self, image: &'a dyn Disk, sector: u64) -> ExtentView<'a> {
        ExtentView::prefix(image, self.sectors * sector)
    }
}

/// The data map a new dense seal of `image` records, or `None` when dense placement does
/// not apply: no data at all (nothing to place) or more than [`MAX_DENSE_RANGES`] ranges
/// (the map would not fit the record); such an image is sealed with the scattered
/// `keep_holes` placement.
pub fn plan(image: &dyn Disk, sector: u64) -> Result<Option<Dense>> {
    let map = image.data_map()?;
    let ranges = map.ranges();
    if ranges.is_empty() || ranges.len() > MAX_DENSE_RANGES {
        return Ok(None);
    }
    // A data map is ascending, disjoint and inside the disk by construction.
    Ok(DataRanges::new(ranges.to_vec(), image.len())
        .ok()
        .map(|r| Dense::new(r, sector)))
}

/// The seal's gather with the tail wipe beside it: `gather` runs on this thread while
/// another overwrites `tail` (the ranges past the dense region that hold data, from
/// [`tail_ranges`]) with zeros; then the image is synced, and only then is `tail`
/// deallocated (DESIGN.md §3: deallocating is not wiping) and synced again.
pub fn gather_and_wipe<T>(
    image: &dyn Disk,
    tail: &[Range<u64>],
    gather: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if tail.is_empty() {
        let out = gather()?;
        image.sync()?;
        return Ok(out);
    }
    let out = std::thread::scope(|sc| {
        let wiper = std::thread::Builder::new()
            .name("pdguard-wipe".into())
            .spawn_scoped(sc, || overwrite(image, tail))
            .map_err(|e| StoreError::io("start the tail wipe of", "the image", e))?;
        let out = gather();
        let wiped = wiper.join().unwrap_or_else(|_| {
            Err(StoreError::io(
                "wipe",
                "the image past its dense region",
                std::io::Error::other("the wipe thread panicked"),
            ))
        });
        out.and_then(|o| wiped.map(|()| o))
    })?;
    image.sync()?;
    deallocate(image, tail)?;
    Ok(out)
}

/// The ranges past `from` that the file system reports as data: what the original held
/// there, or what a rolled-back unseal wrote there (taken now, not from the original's map).
/// The ranges past `from` that the file system reports as data.
pub fn tail_ranges(image: &dyn Disk, from: u64) -> Result<Vec<Range<u64>>> {
    let map = image.data_map()?;
    Ok(map
        .pieces(from, image.len().saturating_sub(from))
        .filter(|(_, data)| *data)
        .map(|(r, _)| r)
        .collect())
}

/// Overwrite `ranges` with zeros, in 1 MiB writes (not synced).
pub fn overwrite(image: &dyn Disk, ranges: &[Range<u64>]) -> Result<()> {
    let zeros = vec![0u8; 1 << 20];
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let n = (r.end - at).min(zeros.len() as u64) as usize;
            image.write_at(&zeros[..n], at)?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Deallocate `ranges` (already overwritten and synced), then sync.
pub fn deallocate(image: &dyn Disk, ranges: &[Range<u64>]) -> Result<()> {
    if ranges.is_empty() {
        return Ok(());
    }
    for r in ranges {
        image.punch(r.start, r.end - r.start)?;
    }
    image.sync()
}

/// After the unseal's gather: deallocate the original's holes (they held sealed data, or
/// were holes already), so that the image's allocation map is the original's again.
/// Only what is allocated now is punched.
pub fn restore_holes(image: &dyn Disk, ranges: &DataRanges) -> Result<()> {
    let map = image.data_map()?;
    for h in ranges.holes(image.len()) {
        for (r, data) in map.pieces(h.start, h.end - h.start) {
            if data {
                image.punch(r.start, r.end - r.start)?;
            }
        }
    }
    image.sync()
}

/// For `verify`: true when nothing past the dense region `[0, from)` holds a byte that is
/// not zero (a seal leaves it all holes).
pub fn tail_is_zero(image: &dyn Disk, from: u64) -> Result<bool> {
    let map = image.data_map()?;
    let mut buf = vec![0u8; 1 << 20];
    for (r, data) in map.pieces(from, image.len().saturating_sub(from)) {
        let mut at = r.start;
        while data && at < r.end {
            let n = (r.end - at).min(buf.len() as u64) as usize;
            image.read_at(&mut buf[..n], at)?;
            if !pdguard_core::digest::is_zero(&buf[..n]) {
                return Ok(false);
            }
            at += n as u64;
        }
    }
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::store::sim::SimStorage;
    use crate::store::{DataMap, Storage};

    /// Logs the calls that change a disk, in order.
    struct Logged<'a> {
        inner: &'a dyn Disk,
        log: Mutex<Vec<String>>,
    }

    impl Disk for Logged<'_> {
        fn len(&self) -> u64 {
            self.inner.len()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            let zeros = pdguard_core::digest::is_zero(buf);
            self.log.lock().unwrap().push(format!(
                "write{} {offset}+{}",
                if zeros { "-zeros" } else { "" },
                buf.len()
            ));
            self.inner.write_at(buf, offset)
        }
        fn punch(&self, offset: u64, len: u64) -> Result<()> {
            self.log
                .lock()
                .unwrap()
                .push(format!("punch {offset}+{len}"));
            Ok(())
        }
        fn sync(&self) -> Result<()> {
            self.log.lock().unwrap().push("sync".into());
            self.inner.sync()
        }
        fn data_map(&self) -> Result<DataMap> {
            self.inner.data_map()
        }
    }

    #[test]
    fn the_tail_is_overwritten_and_synced_before_it_is_deallocated() {
        // Data in block 1 (inside the dense region) and blocks 5 and 7 (past it).
        let mut img = vec![0u8; 8 * 4096];
        for b in [1usize, 5, 7] {
            img[b * 4096..(b + 1) * 4096].fill(0x5a);
        }
        let st = SimStorage::new(img);
        let disk = st.open_image(true).unwrap();
        let logged = Logged {
            inner: &*disk,
            log: Mutex::new(Vec::new()),
        };
        let tail = tail_ranges(&logged, 3 * 4096).unwrap();
        let got = gather_and_wipe(&logged, &tail, || {
            // The gather, beside the wipe: it writes the dense region only.
            logged.inner.write_at(&[0x77; 4096], 0)?;
            Ok(7)
        });
        assert_eq!(got.unwrap(), 7);
        let log = logged.log.into_inner().unwrap();
        assert_eq!(
            log,
            [
                "write-zeros 20480+4096",
                "write-zeros 28672+4096",
                "sync",
                "punch 20480+4096",
                "punch 28672+4096",
                "sync"
            ]
        );
        let after = st.image();
        assert!(
            after[4096..8192].iter().all(|&b| b == 0x5a),
            "dense region kept"
        );
        assert!(after[12288..].iter().all(|&b| b == 0), "tail wiped");
        assert!(tail_is_zero(&*disk, 3 * 4096).unwrap());
        assert!(!tail_is_zero(&*disk, 0).unwrap());
    }

    #[test]
    fn holes_of_the_original_are_deallocated_after_an_unseal() {
        let st = SimStorage::new(vec![0x11; 4 * 4096]);
        let disk = st.open_image(true).unwrap();
        let ranges = DataRanges::new(vec![4096..8192, 12288..16384], 4 * 4096).unwrap();
        restore_holes(&*disk, &ranges).unwrap();
        assert_eq!(
            disk.data_map().unwrap().ranges(),
            &[4096..8192, 12288..16384]
        );
    }

    #[test]
    fn no_data_or_too_many_ranges_is_not_dense() {
        let st = SimStorage::new(vec![0; 4 * 4096]);
        let disk = st.open_image(true).unwrap();
        assert!(plan(&*disk, 512).unwrap().is_none());
        let mut img = vec![0; 4 * 4096];
        img[5000] = 1;
        let st = SimStorage::new(img);
        let disk = st.open_image(true).unwrap();
        let d = plan(&*disk, 512).unwrap().unwrap();
        assert_eq!(d.sectors, 8);
        assert_eq!(d.extents, vec![4096..8192]);
    }
}
