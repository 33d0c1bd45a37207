//! Disk geometry: sector size `S`, word length `W`, sectors `N` and thin-disk slots `M`.
//!
//! The patent counts a disk in sectors ([035], equation (1)) and sizes the thin disk
//! "about same or greater than" the persistent disk ([037]); `M >= N` here, with an
//! optional slack in percent.

use thiserror::Error;

/// Default sector size in bytes ([035]: "a sector size may be, but not limited to, 512 bytes").
pub const DEFAULT_SECTOR_SIZE: u32 = 512;
/// Default word length in bytes ([040]: "considering that the word length is 32 bytes").
pub const DEFAULT_WORD_LENGTH: u32 = 32;
/// Smallest and largest sector sizes accepted.
pub const MIN_SECTOR_SIZE: u32 = 512;
pub const MAX_SECTOR_SIZE: u32 = 65536;
/// Largest thin-disk slack, in percent of the disk.
pub const MAX_THIN_SLACK_PCT: u32 = 1000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum GeometryError {
    #[error(
        "sector size {0} is not a power of two between 512 and 65536; pick one such as 512 or 4096"
    )]
    SectorSize(u64),
    #[error("word length {word} is not a power of two between 1 and the sector size {sector}; the default is 32")]
    WordLength { word: u64, sector: u32 },
    #[error("size {size} bytes is not a multiple of the sector size {sector}; pick a sector size that divides it (512 divides every disk image made by qemu-img or truncate in whole KiB)")]
    Unaligned { size: u64, sector: u32 },
    #[error("size is 0 bytes; there is nothing to seal")]
    Empty,
    #[error("thin-disk slack {0}% is above the maximum of 1000%")]
    Slack(u32),
    #[error("disk of {0} sectors is too large")]
    TooLarge(u64),
}

/// The shape of one seal: how the disk is cut into sectors and how large the thin disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    sector_size: u32,
    word_length: u32,
    sectors: u64,
    thin_sectors: u64,
}

impl Geometry {
    /// Geometry of a disk of `size` bytes with a thin disk `slack_pct` percent larger.
    pub fn new(
        size: u64,
        sector_size: u32,
        word_length: u32,
        slack_pct: u32,
    ) -> Result<Self, GeometryError> {
        if !sector_size.is_power_of_two()
            || !(MIN_SECTOR_SIZE..=MAX_SECTOR_SIZE).contains(&sector_size)
        {
            return Err(GeometryError::SectorSize(sector_size.into()));
        }
        if !word_length.is_power_of_two() || word_length > sector_size {
            return Err(GeometryError::WordLength {
                word: word_length.into(),
                sector: sector_size,
            });
        }
        if slack_pct > MAX_THIN_SLACK_PCT {
            return Err(GeometryError::Slack(slack_pct));
        }
        if size == 0 {
            return Err(GeometryError::Empty);
        }
        if !size.is_multiple_of(u64::from(sector_size)) {
            return Err(GeometryError::Unaligned {
                size,
                sector: sector_size,
            });
        }
        let sectors = size / u64::from(sector_size);
        // ceil(N * pct / 100), computed in u128 so that it cannot overflow.
        let extra = (u128::from(sectors) * u128::from(slack_pct)).div_ceil(100);
        let thin_sectors = u64::try_from(u128::from(sectors) + extra)
            .map_err(|_| GeometryError::TooLarge(sectors))?;
        thin_sectors
            .checked_mul(u64::from(sector_size))
            .ok_or(GeometryError::TooLarge(sectors))?;
        Ok(Self {
            sector_size,
            word_length,
            sectors,
            thin_sectors,
        })
    }

    /// Geometry with explicit `N` and `M` (records store both; tests use FIG. 2's 6 and 12).
    pub fn with_slots(
        sectors: u64,
        thin_sectors: u64,
        sector_size: u32,
        word_length: u32,
    ) -> Result<Self, GeometryError> {
        let g = Self::new(
            sectors
                .checked_mul(u64::from(sector_size))
                .ok_or(GeometryError::TooLarge(sectors))?,
            sector_size,
            word_length,
            0,
        )?;
        if thin_sectors < sectors || thin_sectors.checked_mul(u64::from(sector_size)).is_none() {
            return Err(GeometryError::TooLarge(thin_sectors));
        }
        Ok(Self { thin_sectors, ..g })
    }

    /// `S`: bytes per sector.
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }
    /// `W`: bytes per word of the seed ([040]).
    pub fn word_length(&self) -> u32 {
        self.word_length
    }
    /// `N`: sectors of the persistent disk.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }
    /// `M`: sectors (slots) of the thin disk, `M >= N`: the range of the placement ([041]).
    pub fn thin_sectors(&self) -> u64 {
        self.thin_sectors
    }
    /// Bytes of the persistent disk.
    pub fn disk_bytes(&self) -> u64 {
        self.sectors * u64::from(self.sector_size)
    }
    /// Bytes of the thin disk (apparent size; it is sparse).
    pub fn thin_bytes(&self) -> u64 {
        self.thin_sectors * u64::from(self.sector_size)
    }
    /// Byte offset of sector or slot `index`.
    pub fn offset(&self, index: u64) -> u64 {
        index * u64::from(self.sector_size)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_counts_sectors_as_equation_1() {
        let g = Geometry::new(10 * 1024 * 1024 * 1024, 512, 32, 0).unwrap();
        assert_eq!(g.sectors(), 20_971_520); // [036]: "2,09,71,520"
        assert_eq!(g.thin_sectors(), g.sectors());
    }

    #[test]
    fn slack_rounds_up() {
        let g = Geometry::new(3 * 512, 512, 32, 50).unwrap();
        assert_eq!(g.thin_sectors(), 5); // 3 + ceil(1.5)
        let g = Geometry::new(6 * 512, 512, 32, 100).unwrap();
        assert_eq!(g.thin_sectors(), 12); // FIG. 2
    }

    #[test]
    fn bad_geometry_is_refused() {
        assert_eq!(
            Geometry::new(4096, 1000, 32, 0),
            Err(GeometryError::SectorSize(1000))
        );
        assert_eq!(
            Geometry::new(4096, 256, 32, 0),
            Err(GeometryError::SectorSize(256))
        );
        assert_eq!(
            Geometry::new(4096, 131072, 32, 0),
            Err(GeometryError::SectorSize(131072))
        );
        assert!(matches!(
            Geometry::new(4096, 512, 24, 0),
            Err(GeometryError::WordLength { .. })
        ));
        assert!(matches!(
            Geometry::new(4096, 512, 1024, 0),
            Err(GeometryError::WordLength { .. })
        ));
        assert!(matches!(
            Geometry::new(1000, 512, 32, 0),
            Err(GeometryError::Unaligned { .. })
        ));
        assert_eq!(Geometry::new(0, 512, 32, 0), Err(GeometryError::Empty));
        assert_eq!(
            Geometry::new(512, 512, 32, 1001),
            Err(GeometryError::Slack(1001))
        );
    }

    #[test]
    fn every_power_of_two_sector_size_is_accepted() {
        let mut s = 512;
        while s <= 65536 {
            let g = Geometry::new(u64::from(s) * 4, s, 32, 0).unwrap();
            assert_eq!(g.sectors(), 4);
            s *= 2;
        }
    }
}
