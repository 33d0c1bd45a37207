//! Sizes and durations as people read them in messages and `status`: `10 GiB`, `30 s`,
//! `1 h 30 min`. The JSON answers keep raw bytes and milliseconds; only text uses these.

/// Bytes in the largest binary unit that divides them (`64 MiB`, `1536 MiB`), else in the
/// largest that fits, with one decimal and the exact count (`1.5 KiB (1536 bytes)`).
pub fn bytes(n: u64) -> String {
    const UNITS: [(u32, &str); 6] = [
        (60, "EiB"),
        (50, "PiB"),
        (40, "TiB"),
        (30, "GiB"),
        (20, "MiB"),
        (10, "KiB"),
    ];
    let fits = UNITS.iter().filter(|(shift, _)| n >= 1u64 << shift);
    let mut largest = None;
    for &(shift, unit) in fits {
        largest = largest.or(Some((shift, unit)));
        if n.is_multiple_of(1u64 << shift) {
            return format!("{} {unit}", n >> shift);
        }
    }
    if let Some((shift, unit)) = largest {
        let size = 1u64 << shift;
        return format!("{:.1} {unit} ({n} bytes)", n as f64 / size as f64);
    }
    if n == 1 {
        "1 byte".into()
    } else {
        format!("{n} bytes")
    }
}

/// Milliseconds as days, hours, minutes and seconds, largest first, zero parts left out:
/// `30 s`, `2 min`, `1 h 30 min`, `1.5 s`, `500 ms`, `0 s`.
pub fn millis(ms: u64) -> String {
    if ms == 0 {
        return "0 s".into();
    }
    if ms < 1000 {
        return format!("{ms} ms");
    }
    let mut parts = Vec::new();
    let (secs, rest) = (ms / 1000, ms % 1000);
    for (n, unit) in [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3600, "h"),
        (secs % 3600 / 60, "min"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {unit}"));
        }
    }
    let s = secs % 60;
    match (s, rest) {
        (0, 0) => {}
        (s, 0) => parts.push(format!("{s} s")),
        (s, r) => parts.push(format!(
            "{}.{} s",
            s,
            format!("{r:03}").trim_end_matches('0')
        )),
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes(10 << 30), "10 GiB");
        assert_eq!(bytes(64 << 20), "64 MiB");
        assert_eq!(bytes(512), "512 bytes");
        assert_eq!(bytes(1), "1 byte");
        assert_eq!(bytes(0), "0 bytes");
        assert_eq!(bytes(1536), "1.5 KiB (1536 bytes)");
        assert_eq!(bytes(3 << 29), "1536 MiB");
        assert_eq!(bytes(u64::MAX), "16.0 EiB (18446744073709551615 bytes)");
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(millis(30_000), "30 s");
        assert_eq!(millis(120_000), "2 min");
        assert_eq!(millis(5_400_000), "1 h 30 min");
        assert_eq!(millis(1_500), "1.5 s");
        assert_eq!(millis(61_250), "1 min 1.25 s");
        assert_eq!(millis(500), "500 ms");
        assert_eq!(millis(0), "0 s");
        assert_eq!(millis(90_061_000), "1 d 1 h 1 min 1 s");
    }
}
