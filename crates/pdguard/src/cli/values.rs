//! Parsers of numeric flags whose valid values are known without looking at an image, so
//! that a bad one is a usage error (exit 2) that names the valid ones.

/// `--sector-size`: a power of two from 512 to 65536.
pub fn sector_size(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(n) if n.is_power_of_two() && (512..=65536).contains(&n) => Ok(n),
        _ => Err("not a power of two from 512 to 65536; use 512 (the default) or 4096".into()),
    }
}

/// `--word-length`: a power of two from 1 (at most the sector size, checked with the image).
pub fn word_length(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(n) if n.is_power_of_two() && n <= 65536 => Ok(n),
        _ => Err("not a power of two up to the sector size; the default is 32".into()),
    }
}

/// `--jobs`: at least one.
pub fn jobs(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("0 jobs would never seal or unseal a disk; give 1 or more".into()),
        Err(_) => Err("not a number of jobs; give 1 or more (default: one per core)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        assert_eq!(sector_size("512"), Ok(512));
        assert_eq!(sector_size("65536"), Ok(65536));
        for bad in ["256", "1000", "131072", "-512", "x", ""] {
            assert!(sector_size(bad).is_err(), "{bad}");
        }
        assert_eq!(word_length("1"), Ok(1));
        assert_eq!(word_length("32"), Ok(32));
        for bad in ["0", "3", "x"] {
            assert!(word_length(bad).is_err(), "{bad}");
        }
        assert_eq!(jobs("2"), Ok(2));
        assert!(jobs("0").is_err());
        assert!(jobs("-1").is_err());
    }
}
