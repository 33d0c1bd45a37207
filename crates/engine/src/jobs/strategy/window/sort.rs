//! The radix sort of a window's sectors by index.

use super::*;

/// Sorts `v` by sector index (`.0`, below `sectors`): an LSD radix sort, 11 bits a pass, for
/// all but small windows (a window holds up to millions of sectors, and a comparison sort of
/// every window was most of a sealed pass's planning).
pub(super) fn sort_by_sector(v: &mut Vec<(u64, u32)>, tmp: &mut Vec<(u64, u32)>, sectors: u64) {
    const BITS: u32 = 11;
    if v.len() < 1024 {
        v.sort_unstable_by_key(|p| p.0);
        return;
    }
    let key_bits = u64::BITS - sectors.saturating_sub(1).leading_zeros();
    let mask = (1u64 << BITS) - 1;
    let mut shift = 0;
    while shift < key_bits {
        let mut count = [0usize; 1 << BITS];
        for &(i, _) in v.iter() {
            count[((i >> shift) & mask) as usize] += 1;
        }
        let mut sum = 0;
        for c in &mut count {
            (*c, sum) = (sum, sum + *c);
        }
        tmp.clear();
        tmp.resize(v.len(), (0, 0));
        for &e in v.iter() {
            let d = ((e.0 >> shift) & mask) as usize;
            tmp[count[d]] = e;
            count[d] += 1;
        }
        mem::swap(v, tmp);
        shift += BITS;
    }
}
