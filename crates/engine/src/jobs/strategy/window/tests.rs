//! Unit tests of the `window` strategy.

use super::layout::isqrt;
use super::*;
use crate::jobs::strategy::DEFAULT_MEMORY_BYTES;
use pdguard_core::{Placement, PlacementKind};
use std::sync::atomic::{AtomicU64, Ordering};

fn lay(sectors: u64, slots: u64, sector: u32) -> Layout {
    Layout::new(&Geometry::with_slots(sectors, slots, sector, 32).unwrap_or_else(|e| panic!("{e}")))
}

/// A placement that counts its evaluations.
struct Counting<'a>(&'a dyn Placement, AtomicU64, AtomicU64);

impl Placement for Counting<'_> {
    fn sectors(&self) -> u64 {
        self.0.sectors()
    }
    fn slots(&self) -> u64 {
        self.0.slots()
    }
    fn slot_of(&self, sector: u64) -> u64 {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.slot_of(sector)
    }
    fn sector_of(&self, slot: u64) -> Option<u64> {
        self.2.fetch_add(1, Ordering::Relaxed);
        self.0.sector_of(slot)
    }
}

#[test]
fn a_job_evaluates_the_placement_once_when_the_budget_allows() {
    use crate::jobs::NoProgress;
    use crate::store::sim::SimStorage;
    let g = Geometry::new(2000 * 512, 512, 32, 25).unwrap_or_else(|e| panic!("{e}"));
    let (n, m) = (g.sectors(), g.thin_sectors());
    let inner = pdguard_core::placement::build(PlacementKind::Feistel, b"k", n, m)
        .unwrap_or_else(|e| panic!("{e}"));
    let p = Counting(&*inner, AtomicU64::new(0), AtomicU64::new(0));
    let st = SimStorage::new(Vec::new());
    let disk = |name: &str, len| st.scratch_disk(name, len);
    let (image, thin) = (disk("image", g.disk_bytes()), disk("thin", g.thin_bytes()));
    let (slot_of, sector_of) = (
        || p.1.load(Ordering::Relaxed),
        || p.2.load(Ordering::Relaxed),
    );
    for (memory, mapped) in [(DEFAULT_MEMORY_BYTES, true), (8 * n, false)] {
        let ctx = PassCtx {
            geometry: g,
            placement: &p,
            cipher: None,
            digest_key: None,
            digest: pdguard_core::digest::DigestScheme::DEFAULT,
            keep_holes: false,
            progress: &NoProgress,
            memory_bytes: memory,
            regions: None,
        };
        let w = Window::default();
        let run = |f: &dyn Fn() -> Result<blake3::Hash>| {
            let before = (slot_of(), sector_of());
            f().unwrap_or_else(|e| panic!("{e}"));
            (slot_of() - before.0, sector_of() - before.1)
        };
        // Each pass that uses or keeps a map probes pi three times.
        let probes = if mapped { 3 } else { 0 };
        let scatter = run(&|| w.scatter_plain(&ctx, &*image, &*thin));
        assert_eq!(scatter, (n + probes, 0), "memory {memory}");
        assert_eq!(w.lock().is_some(), mapped);
        let gather = run(&|| w.gather_sealed(&ctx, &*thin, &*image));
        let want = if mapped { (3, 0) } else { (0, m) };
        assert_eq!(gather, want, "memory {memory}");
        assert!(w.lock().is_none(), "a map outlived the pass that used it");
        let scatter = run(&|| w.scatter_sealed(&ctx, &*image, &*thin));
        assert_eq!(scatter, (probes, m), "memory {memory}");
        let gather = run(&|| w.gather_plain(&ctx, &*thin, &*image));
        let want = if mapped { (3, 0) } else { (n, 0) };
        assert_eq!(gather, want, "memory {memory}");
    }
}

/// A disk that only records what is released.
#[derive(Default)]
struct Releases(Mutex<Vec<(u64, u64)>>);

impl Disk for Releases {
    fn len(&self) -> u64 {
        u64::MAX
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> Result<()> {
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
        Ok(())
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn release(&self, offset: u64, len: u64) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((offset, len));
    }
}

#[test]
fn write_behind_releases_every_large_range_once_and_leaves_small_ones_to_fsync() {
    let k = 256 << 10;
    let d = Releases::default();
    let mut wb = WriteBehind::default();
    // 40 consecutive writes, then two interleaved streams, then one more write.
    for n in 0..40 {
        wb.wrote(&d, n * k, k);
    }
    for n in 0..3 {
        wb.wrote(&d, (100 + n) * k, k);
        wb.wrote(&d, (200 + n) * k, k);
    }
    wb.wrote(&d, 300 * k, 100);
    wb.flush(&d);
    let got = d.0.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut want = vec![(0, RELEASE_BYTES), (RELEASE_BYTES, RELEASE_BYTES)];
    want.push((2 * RELEASE_BYTES, 40 * k - 2 * RELEASE_BYTES));
    for n in 0..3 {
        want.push(((100 + n) * k, k));
        want.push(((200 + n) * k, k));
    }
    // The last write, 100 bytes on its own, is left to the fsync.
    assert_eq!(got, want);
}

#[test]
fn radix_sort_sorts_by_sector_like_a_comparison_sort() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for (len, sectors) in [(0usize, 1u64), (5, 10), (5000, 5000), (20_000, 1 << 40)] {
        let mut v: Vec<(u64, u32)> = (0..len)
            .map(|k| (rng.gen_range(0..sectors), k as u32))
            .collect();
        let mut want = v.clone();
        want.sort_by_key(|p| p.0); // stable, like the radix sort
        sort_by_sector(&mut v, &mut Vec::new(), sectors);
        assert_eq!(v, want, "len {len}");
    }
}

#[test]
fn isqrt_is_exact() {
    for n in [
        0u128,
        1,
        2,
        3,
        4,
        15,
        16,
        17,
        1 << 49,
        (1 << 97) - 1,
        99_999_999_999,
    ] {
        let r = isqrt(n);
        assert!(r * r <= n && (r + 1) * (r + 1) > n, "{n}");
    }
}

#[test]
fn layout_depends_on_slots_and_sector_size_only_and_is_pinned() {
    // Pinned: a change here changes where resumed jobs look for their sectors.
    let cases = [
        (6u64, 12u64, 512u32, 2u64),
        (24, 24, 512, 3),
        (1, 1, 512, 1),
        (8 << 20, 8 << 20, 512, 46_340),
        (1 << 20, 1 << 20, 4096, 5_792),
        (128 << 20, 128 << 20, 512, 185_363),
    ];
    for (n, m, s, k) in cases {
        assert_eq!(lay(n, m, s).window_slots(), k, "N={n} M={m} S={s}");
        assert_eq!(lay(n.min(m / 2).max(1), m, s), lay(n, m, s));
    }
}

#[test]
fn budget_stays_within_memory_above_the_floor() {
    let l = lay(8 << 20, 8 << 20, 512);
    let b = Budget::new(256 << 20, &l);
    let plain = CHUNKS * b.chunk + (l.windows() as usize + b.in_flight) * b.window_buf;
    assert!(plain <= 256 << 20, "{b:?}");
    assert!(4 * b.slice * 512 <= 256 << 20, "{b:?}");
    assert_eq!(b.slice, l.window_slots(), "a window fits in one slice");
    let tiny = Budget::new(1, &l);
    assert_eq!((tiny.chunk, tiny.window_buf), (512, 512));
    assert_eq!(tiny.slice, l.window_slots().div_ceil(MAX_SLICES));
}

/// The plain passes hash the region tree on a thread of their own: it must still see every
/// byte of the plaintext once, in image order (several chunks, a last one shorter), and the
/// image digest must not change for it.
#[test]
fn the_plain_passes_feed_the_region_tree_every_byte_in_image_order() {
    use super::super::RegionTap;
    use crate::jobs::NoProgress;
    use crate::store::sim::SimStorage;
    use pdguard_core::region_tree::{RegionHasher, RegionKeys, RegionLayout};
    use rand::{RngCore, SeedableRng};
    let g = Geometry::new(9000 * 512, 512, 32, 25).unwrap_or_else(|e| panic!("{e}"));
    let (n, m) = (g.sectors(), g.thin_sectors());
    let p = pdguard_core::placement::build(PlacementKind::Feistel, b"k", n, m)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut img = vec![0u8; g.disk_bytes() as usize];
    rand::rngs::StdRng::seed_from_u64(18).fill_bytes(&mut img);
    let st = SimStorage::new(Vec::new());
    let (image, thin) = (
        st.scratch_disk("image", g.disk_bytes()),
        st.scratch_disk("thin", g.thin_bytes()),
    );
    image.write_at(&img, 0).unwrap_or_else(|e| panic!("{e}"));
    let layout = RegionLayout::new(64 << 10, img.len() as u64).unwrap_or_else(|e| panic!("{e}"));
    let want = {
        let mut h = RegionHasher::new(layout, RegionKeys::new(None));
        h.update(&img);
        h.finish().unwrap_or_else(|e| panic!("{e}")).1
    };
    let w = Window::default();
    // 64 KiB chunks: the pass sends 71 of them, the last one shorter.
    let ctx = |regions| PassCtx {
        geometry: g,
        placement: &*p,
        cipher: None,
        digest_key: None,
        digest: pdguard_core::digest::DigestScheme::DEFAULT,
        keep_holes: false,
        progress: &NoProgress,
        memory_bytes: 1 << 20,
        regions,
    };
    let ok = |r: Result<blake3::Hash>| r.unwrap_or_else(|e| panic!("{e}"));
    let taps = [(); 2].map(|()| RegionTap::new(layout, RegionKeys::new(None), None));
    let plain = ok(w.scatter_plain(&ctx(None), &*image, &*thin));
    assert_eq!(
        ok(w.scatter_plain(&ctx(Some(&taps[0])), &*image, &*thin)),
        plain
    );
    ok(w.gather_sealed(&ctx(None), &*thin, &*image));
    ok(w.scatter_sealed(&ctx(None), &*image, &*thin));
    assert_eq!(
        ok(w.gather_plain(&ctx(Some(&taps[1])), &*thin, &*image)),
        plain
    );
    let [scatter, gather] = taps.map(|t| t.finish().map(|t| t.1));
    assert_eq!(scatter, Some(want), "scatter");
    assert_eq!(gather, Some(want), "gather");
    let mut back = vec![0u8; img.len()];
    image
        .read_at(&mut back, 0)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(back == img, "not bit-exact");
}
