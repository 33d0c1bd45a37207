//! The duration parsers: a volume's `-o grace=` (with the rest of `docker volume create
//! -o`, `VolumeOptions::parse` in the engine) against a reference written from
//! docs/docker-plugin.md, and the CLI's duration flags (`--grace`, `--docker-resync`,
//! `--nbd-hold`, `disk wait --timeout`: humantime), whose parse of its own formatting
//! must give back the same duration.
//!
//! Input: one mode byte, then UTF-8 text (invalid bytes replaced):
//! - mode 0: the value of `grace`; mode 1: the value of `size`;
//! - mode 2: any options, one `key=value` a line;
//! - mode 3: a CLI duration.

use std::collections::BTreeMap;
use std::time::Duration;

use pdguard_core::Profile;
use pdguard_engine::registry::VolumeReclaim;
use pdguard_engine::service::{VolumeError, VolumeOptions};

pub fn check(data: &[u8]) {
    let (mode, rest) = super::split_mode(data);
    let text = String::from_utf8_lossy(rest).into_owned();
    let opts: BTreeMap<String, String> = match mode % 4 {
        0 => [("size", "1G"), ("grace", text.as_str())]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into(),
        1 => [("size".to_string(), text.clone())].into(),
        2 => text
            .lines()
            .map(|l| l.split_once('=').unwrap_or((l, "")))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        _ => return cli_duration(&text),
    };
    volume_options(&opts);
}

/// `VolumeOptions::parse` against the reference, for both default profiles.
pub fn volume_options(opts: &BTreeMap<String, String>) {
    for default in [Profile::Secure, Profile::Patent] {
        let got = VolumeOptions::parse(opts, default);
        match (got, reference(opts, default)) {
            (Ok(o), Ok(w)) => assert_eq!(o, w, "{opts:?}"),
            (Err(e), Err(w)) => {
                let same = match (&e, &w) {
                    (VolumeError::NoSize, Refusal::NoSize) => true,
                    (VolumeError::Unknown(k), Refusal::Unknown(w)) => k == w,
                    (VolumeError::Bad { key, value, why }, Refusal::Bad(w)) => {
                        key == w && opts.get(*key) == Some(value) && !why.is_empty()
                    }
                    _ => false,
                };
                assert!(
                    same,
                    "{opts:?}: refused with {e:?}, the reference says {w:?}"
                );
            }
            (got, want) => panic!("{opts:?}: parsed {got:?}, the reference says {want:?}"),
        }
    }
}

#[derive(Debug)]
enum Refusal {
    NoSize,
    Unknown(String),
    Bad(&'static str),
}

/// docs/docker-plugin.md: `size` (required), `fs=ext4`, `profile=secure|patent`,
/// `grace=<n>ms|s|m|h`, `keep_holes=true|false`, `reclaim=instant|copy`; the first bad option (in key order) is
/// the one named.
fn reference(opts: &BTreeMap<String, String>, default: Profile) -> Result<VolumeOptions, Refusal> {
    let mut o = VolumeOptions {
        size: 0,
        fs: "ext4".into(),
        profile: default,
        keep_holes: true,
        grace: None,
        reclaim: VolumeReclaim::Copy,
    };
    let mut size = None;
    for (k, v) in opts {
        match k.as_str() {
            "size" => size = Some(volume_size(v).ok_or(Refusal::Bad("size"))?),
            "fs" if v == "ext4" => {}
            "fs" => return Err(Refusal::Bad("fs")),
            "profile" if v == "secure" => o.profile = Profile::Secure,
            "profile" if v == "patent" => o.profile = Profile::Patent,
            "profile" => return Err(Refusal::Bad("profile")),
            "grace" => {
                let ms = grace_ms(v).ok_or(Refusal::Bad("grace"))?;
                o.grace = Some(Duration::from_millis(ms));
            }
            "keep_holes" if v == "true" => o.keep_holes = true,
            "keep_holes" if v == "false" => o.keep_holes = false,
            "keep_holes" => return Err(Refusal::Bad("keep_holes")),
            "reclaim" if v == "instant" => o.reclaim = VolumeReclaim::Instant,
            "reclaim" if v == "copy" => o.reclaim = VolumeReclaim::Copy,
            "reclaim" => return Err(Refusal::Bad("reclaim")),
            other => return Err(Refusal::Unknown(other.to_string())),
        }
    }
    o.size = size.ok_or(Refusal::NoSize)?;
    Ok(o)
}

/// Decimal digits then a unit, surrounding white space ignored; the value in 128 bits.
fn number_and_unit(text: &str) -> Option<(u128, &str)> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let mut n = 0u128;
    for b in t[..digits].bytes() {
        n = n * 10 + u128::from(b - b'0');
        if n > u128::from(u64::MAX) {
            return None;
        }
    }
    Some((n, &t[digits..]))
}

/// A volume's grace in milliseconds: units `ms`, `s`, `m`, `h`, exactly so spelt; at most
/// ten years (`MAX_GRACE_MS`), so that `now + grace` cannot wrap.
fn grace_ms(text: &str) -> Option<u64> {
    let (n, unit) = number_and_unit(text)?;
    let per = match unit {
        "ms" => 1u128,
        "s" => 1000,
        "m" => 60 * 1000,
        "h" => 3600 * 1000,
        _ => return None,
    };
    u64::try_from(n * per)
        .ok()
        .filter(|ms| *ms <= pdguard_engine::service::MAX_GRACE_MS)
}

/// A volume's size: binary units, any case, with or without `B`/`iB`; at least 1 MiB and
/// a whole number of the volume's 4096-byte sectors.
fn volume_size(text: &str) -> Option<u64> {
    let (n, unit) = number_and_unit(text)?;
    let units = [("", 0), ("k", 10), ("m", 20), ("g", 30), ("t", 40)];
    let shift = units.iter().find_map(|(u, shift)| {
        let spelt = |s: String| unit.eq_ignore_ascii_case(&s);
        let any = spelt(u.to_string()) || spelt(format!("{u}b"));
        (any || (!u.is_empty() && spelt(format!("{u}ib")))).then_some(*shift)
    })?;
    let bytes = u64::try_from(n << shift).ok()?;
    (bytes >= 1 << 20 && bytes.is_multiple_of(4096)).then_some(bytes)
}

/// The CLI's durations: what humantime parses, it formats as text that parses back to
/// the same duration (so a duration shown in an error or in `--help` can be pasted back).
fn cli_duration(text: &str) {
    let Ok(d) = humantime::parse_duration(text) else {
        return;
    };
    let shown = humantime::format_duration(d).to_string();
    assert_eq!(
        humantime::parse_duration(&shown).ok(),
        Some(d),
        "{text:?} is {d:?}, shown as {shown:?}"
    );
}
