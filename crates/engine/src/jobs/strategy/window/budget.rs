//! How a pass spends its memory budget (`--memory`) on buffers and slices.

use super::*;

/// How a pass spends its memory budget. Never changes where bytes go.
#[derive(Debug, Clone, Copy)]
pub(super) struct Budget {
    /// Bytes per sequential image-side I/O of a plain pass.
    pub(super) chunk: usize,
    /// Bytes of one window's buffer in a plain scatter; a plain gather reads each window
    /// ahead in two halves of it.
    pub(super) window_buf: usize,
    /// Window buffers in flight to the writer of a plain scatter.
    pub(super) in_flight: usize,
    /// Sectors per piece (read) and slice (written) of a sealed pass.
    pub(super) slice: u64,
}

impl Budget {
    pub(super) fn new(memory: u64, lay: &Layout) -> Self {
        let s = lay.sector;
        let sectors = |b: u64| (b / s).max(1);
        let chunk = sectors(MAX_CHUNK.min(memory / 16));
        let rest = memory.saturating_sub(CHUNKS as u64 * chunk * s);
        let per_window = rest / (lay.windows() + IN_FLIGHT as u64);
        let window_buf = sectors(MAX_WINDOW_BUF.min(per_window));
        let spare_bufs = (rest / (window_buf * s)).saturating_sub(lay.windows());
        let in_flight = (IN_FLIGHT_BYTES / (window_buf * s))
            .min(spare_bufs)
            .max(IN_FLIGHT as u64);
        let slice = sectors(memory / 4)
            .max(lay.window.div_ceil(MAX_SLICES))
            .min(lay.window);
        Self {
            chunk: (chunk * s) as usize,
            window_buf: (window_buf * s) as usize,
            in_flight: in_flight as usize,
            slice,
        }
    }
}
