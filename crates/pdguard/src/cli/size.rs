//! The one parser of sizes on the command line (`disk create --size`, `--memory`,
//! `demo --size`): what people write — `4096`, `512K`, `1.5G`, `1GiB`, `10G`, `64 MB` — as
//! a whole number of bytes. K, M, G and T are powers of 1024, with or without `B` or `iB`.

use thiserror::Error;

/// The smallest sector size pdguard knows: every sector size (a power of two from 512 to
/// 65536) is a multiple of it, so a size that it does not divide no sector size divides.
pub const MIN_SECTOR: u64 = 512;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("a size is required, such as 64M or 1G")]
    Empty,
    #[error(
        "{0:?}: a size cannot be negative; give bytes or a number with K, M, G or T, such as 64M"
    )]
    Negative(String),
    #[error("{0:?} is not a size; give bytes or a number with K, M, G or T (powers of 1024), such as 4096, 512K, 1.5G or 1GiB")]
    Syntax(String),
    #[error("{text:?} is {whole}.{frac} bytes, not a whole number of bytes; give more digits of the unit below (e.g. K instead of M)")]
    Fraction {
        text: String,
        whole: u128,
        frac: String,
    },
    #[error("{0:?} is too large: sizes go up to 16 EiB")]
    TooLarge(String),
    #[error("{0:?} is zero bytes; give a size above zero, such as 64M")]
    Zero(String),
    #[error("{text:?} is {bytes} bytes, not a whole number of 512-byte sectors, so no sector size divides it; use {down} or {up}")]
    NotSectors {
        text: String,
        bytes: u64,
        down: String,
        up: String,
    },
    #[error("{text:?} is out of range: give {range}")]
    Range { text: String, range: &'static str },
}

fn unit(suffix: &str) -> Option<u32> {
    let s = suffix.to_ascii_lowercase();
    // `iB` is a binary prefix's ending, not a unit: `5iB` is not 5 bytes.
    if s == "ib" {
        return None;
    }
    let s = s
        .strip_suffix("ib")
        .or_else(|| s.strip_suffix('b'))
        .unwrap_or(&s);
    match s {
        "" => Some(0),
        "k" => Some(10),
        "m" => Some(20),
        "g" => Some(30),
        "t" => Some(40),
        _ => None,
    }
}

/// Parse a size in bytes. Fractions are allowed when the result is a whole number of bytes
/// (`1.5K` is 1536 bytes; `0.3K` is refused, being 307.2 bytes).
pub fn parse(text: &str) -> Result<u64, SizeError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    if s.starts_with('-') {
        return Err(SizeError::Negative(text.into()));
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let shift = unit(suffix.trim_start()).ok_or_else(|| SizeError::Syntax(text.into()))?;
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    // Digits only, at least one of them, and a bounded fraction (the arithmetic is exact).
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) || frac.len() > 20 {
        return Err(SizeError::Syntax(text.into()));
    }
    let too_large = || SizeError::TooLarge(text.into());
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_large())?
    };
    let scale = 10u128.pow(frac.len() as u32);
    let frac_num: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| SizeError::Syntax(text.into()))?
    };
    let whole = int.checked_shl(shift).filter(|v| v >> shift == int);
    let whole = whole.ok_or_else(too_large)?;
    // frac_num < 10^20 and the shift is at most 40: no overflow of u128.
    let frac_bytes = frac_num << shift;
    if !frac_bytes.is_multiple_of(scale) {
        let rem = frac_bytes % scale;
        let digits = format!("{rem:0width$}", width = frac.len());
        return Err(SizeError::Fraction {
            text: text.into(),
            whole: whole + frac_bytes / scale,
            frac: digits.trim_end_matches('0').to_string(),
        });
    }
    let bytes = whole
        .checked_add(frac_bytes / scale)
        .ok_or_else(too_large)?;
    u64::try_from(bytes).map_err(|_| too_large())
}

/// A size for people: the largest unit that divides it exactly (`1536` is `1536`, `1048576`
/// is `1M`, `1610612736` is `1536M`).
pub fn human(bytes: u64) -> String {
    for (shift, u) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{u}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// A size that must be above zero (`--memory`).
pub fn positive(text: &str) -> Result<u64, SizeError> {
    match parse(text)? {
        0 => Err(SizeError::Zero(text.into())),
        b => Ok(b),
    }
}

/// The size of a disk: above zero and a whole number of sectors of every size
/// (`disk create --size`).
pub fn disk(text: &str) -> Result<u64, SizeError> {
    let bytes = positive(text)?;
    if !bytes.is_multiple_of(MIN_SECTOR) {
        let down = bytes / MIN_SECTOR * MIN_SECTOR;
        // Within 512 bytes of 2^64 there is no multiple above (saturating gave 2^64 - 1,
        // itself no disk size): the one below is named twice, as 0 is below 512.
        let up = down.checked_add(MIN_SECTOR).unwrap_or(down);
        let down = if down == 0 { up } else { down };
        return Err(SizeError::NotSectors {
            text: text.into(),
            bytes,
            down: human(down),
            up: human(up),
        });
    }
    Ok(bytes)
}

/// The size of the demo's sample image: a disk size from 8K to 1G.
pub fn demo(text: &str) -> Result<u64, SizeError> {
    let bytes = disk(text)?;
    if !(8 << 10..=1 << 30).contains(&bytes) {
        return Err(SizeError::Range {
            text: text.into(),
            range: "a size from 8K to 1G, such as 8M",
        });
    }
    Ok(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn what_people_write() {
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("512K"), Ok(512 << 10));
        assert_eq!(parse("64M"), Ok(64 << 20));
        assert_eq!(parse("1g"), Ok(1 << 30));
        assert_eq!(parse("10G"), Ok(10 << 30));
        assert_eq!(parse("1GiB"), Ok(1 << 30));
        assert_eq!(parse("1GB"), Ok(1 << 30));
        assert_eq!(parse("1.5G"), Ok(3 << 29));
        assert_eq!(parse("1.5K"), Ok(1536));
        assert_eq!(parse(".5M"), Ok(512 << 10));
        assert_eq!(parse("2."), Ok(2));
        assert_eq!(parse("64 MiB"), Ok(64 << 20));
        assert_eq!(parse(" 8M "), Ok(8 << 20));
        assert_eq!(parse("100b"), Ok(100));
        assert_eq!(parse("2T"), Ok(2 << 40));
    }

    #[test]
    fn what_is_refused() {
        assert_eq!(parse(""), Err(SizeError::Empty));
        assert!(matches!(parse("-5M"), Err(SizeError::Negative(_))));
        for bad in [
            "M", "abc", "1.2.3G", "1X", "1KK", "1 G B", ".", "1e6", "0x10", "1,5G",
            // Found by the `size` fuzz target: a bare `iB` read as bytes.
            "5iB", "1.0iB", "5 ib",
        ] {
            assert!(matches!(parse(bad), Err(SizeError::Syntax(_))), "{bad}");
        }
        assert!(matches!(parse("0.3K"), Err(SizeError::Fraction { .. })));
        assert!(matches!(parse("1.5"), Err(SizeError::Fraction { .. })));
        assert!(matches!(parse("99999999999T"), Err(SizeError::TooLarge(_))));
        assert!(matches!(
            parse("99999999999999999999999999999999999999999"),
            Err(SizeError::TooLarge(_))
        ));
        assert_eq!(
            parse("16777216T"),
            Err(SizeError::TooLarge("16777216T".into()))
        );
        assert_eq!(parse("16777215T"), Ok(16777215 << 40));
        assert!(matches!(positive("0"), Err(SizeError::Zero(_))));
        assert!(matches!(positive("0K"), Err(SizeError::Zero(_))));
    }

    #[test]
    fn messages_name_the_value_and_the_fix() {
        let e = parse("0.3K").unwrap_err().to_string();
        assert!(e.contains("307.2 bytes"), "{e}");
        let e = disk("1000").unwrap_err().to_string();
        assert!(e.contains("no sector size divides it"), "{e}");
        assert!(e.contains("use 512 or 1K"), "{e}");
        let e = disk("100").unwrap_err().to_string();
        assert!(e.contains("use 512 or 512"), "{e}");
        // Found by the `size` fuzz target: the largest size suggested 2^64 - 1 bytes.
        let e = disk("18446744073709551615").unwrap_err().to_string();
        assert!(
            e.contains("use 18446744073709551104 or 18446744073709551104"),
            "{e}"
        );
        let e = disk("1.1K").unwrap_err().to_string();
        assert!(e.contains("1126.4 bytes"), "{e}");
        assert!(parse("-5M").unwrap_err().to_string().contains("negative"));
    }

    #[test]
    fn disk_and_demo_sizes() {
        assert_eq!(disk("1.5G"), Ok(3 << 29));
        assert_eq!(disk("512"), Ok(512));
        assert!(matches!(disk("513"), Err(SizeError::NotSectors { .. })));
        assert_eq!(demo("8M"), Ok(8 << 20));
        assert_eq!(demo("8K"), Ok(8 << 10));
        assert_eq!(demo("1G"), Ok(1 << 30));
        assert!(matches!(demo("4K"), Err(SizeError::Range { .. })));
        assert!(matches!(demo("1.5G"), Err(SizeError::Range { .. })));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(1536), "1536");
        assert_eq!(human(512), "512");
        assert_eq!(human(1 << 20), "1M");
        assert_eq!(human(3 << 29), "1536M");
        assert_eq!(human(0), "0");
    }

    proptest! {
        /// Every size written with any unit spelling, whole or as an exact fraction of the
        /// unit, parses back to its bytes; `human` round-trips.
        #[test]
        fn round_trips(bytes in 0u64..(1 << 50), unit in 0usize..5, spelling in 0usize..4, lower: bool) {
            let shift = [0u32, 10, 20, 30, 40][unit];
            let letter = ["", "K", "M", "G", "T"][unit];
            let suffix = if letter.is_empty() {
                ["", "B", "", " B"][spelling].to_string()
            } else {
                [letter.to_string(), format!("{letter}B"), format!("{letter}iB"), format!(" {letter}iB")][spelling].clone()
            };
            let suffix = if lower { suffix.to_lowercase() } else { suffix };
            let unit_bytes = 1u64 << shift;
            let int = bytes / unit_bytes;
            // The remainder over 2^shift is a finite decimal of at most `shift` digits.
            let mut frac = String::new();
            let mut r = u128::from(bytes % unit_bytes);
            while r != 0 {
                r *= 10;
                frac.push(char::from(b'0' + (r >> shift) as u8));
                r &= (1u128 << shift) - 1;
            }
            let text = if frac.is_empty() { format!("{int}{suffix}") } else { format!("{int}.{frac}{suffix}") };
            if frac.len() > 20 {
                // More fraction digits than the parser reads: refused, never misread.
                prop_assert!(matches!(parse(&text), Err(SizeError::Syntax(_))), "{}", text);
            } else {
                prop_assert_eq!(parse(&text), Ok(bytes), "{}", text);
            }
            prop_assert_eq!(parse(&human(bytes)), Ok(bytes));
        }

        /// Nothing panics, and whatever parses is what the digits say, or an error.
        #[test]
        fn never_panics(text in "[-0-9. kKmMgGtTiIbBx]{0,30}") {
            let _ = parse(&text);
            let _ = disk(&text);
            let _ = demo(&text);
        }

        /// A size below 1K written as a fraction of K parses only when exact.
        #[test]
        fn fractions_are_exact(num in 0u32..1000) {
            let text = format!("0.{num:03}K");
            let exact = (u64::from(num) * 1024).is_multiple_of(1000);
            prop_assert_eq!(parse(&text).is_ok(), exact, "{}", text);
        }
    }
}
