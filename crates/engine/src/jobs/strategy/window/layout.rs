//! The thin-disk layout: windows of `K` slots, a pure function of `M` and `S`.

use super::*;

/// The thin-disk layout of the `window` strategy: windows of `K` slots. A pure function of the
/// record's slot count `M` and sector size `S`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub(super) slots: u64,
    pub(super) sector: u64,
    pub(super) window: u64,
}

impl Layout {
    /// `K = max(1, min(floor(isqrt(M * S * 2^17) / S), ceil(M / 8), 2^31))`.
    pub fn new(g: &Geometry) -> Self {
        let slots = g.thin_sectors();
        let sector = u64::from(g.sector_size());
        let target = isqrt(u128::from(slots) * u128::from(sector) * REGION_FACTOR);
        let by_size = u64::try_from(target / u128::from(sector)).unwrap_or(u64::MAX);
        let most = slots.div_ceil(MIN_WINDOWS).clamp(1, MAX_WINDOW_SLOTS);
        let window = by_size.clamp(1, most);
        Self {
            slots,
            sector,
            window,
        }
    }

    /// `K`: slots per window (the last window may have fewer).
    pub fn window_slots(&self) -> u64 {
        self.window
    }

    /// `W = ceil(M / K)`: number of windows.
    pub fn windows(&self) -> u64 {
        self.slots.div_ceil(self.window)
    }

    /// The window that holds `slot`.
    pub fn window_of(&self, slot: u64) -> usize {
        (slot / self.window) as usize
    }

    pub(super) fn first_slot(&self, w: usize) -> u64 {
        w as u64 * self.window
    }

    /// Slots in window `w`.
    pub(super) fn capacity(&self, w: usize) -> u64 {
        self.window.min(self.slots - self.first_slot(w))
    }

    /// Byte offset on the thin disk of the `r`-th packed sector of window `w`.
    pub fn packed_offset(&self, w: usize, r: u64) -> u64 {
        (self.first_slot(w) + r) * self.sector
    }
}

/// `floor(sqrt(n))`, exact.
pub(super) fn isqrt(n: u128) -> u128 {
    let mut x = (n as f64).sqrt() as u128;
    while x * x > n {
        x -= 1;
    }
    while (x + 1) * (x + 1) <= n {
        x += 1;
    }
    x
}
