//! Per-sector encryption of the secure profile. The patent profile uses none.

/// Encrypts and decrypts one sector in place, tweaked by the thin-disk slot it occupies.
pub trait SectorCipher: Send + Sync {
    fn encrypt(&self, slot: u64, sector: &mut [u8]);
    fn decrypt(&self, slot: u64, sector: &mut [u8]);
}
