//! The CLI's size parser (`cli/size.rs`: `disk create --size`, `--memory`, `demo --size`)
//! against a slow reference written from its documentation: the number is kept as a
//! string of decimal digits, multiplied by 2^shift by doubling digit by digit, and the
//! fraction's digits split off at the end, so no integer type can overflow or round.
//! `positive`, `disk` and `demo` are checked on top of it, the sizes their messages
//! suggest must themselves be accepted, and `human` must read back as the same size.
//!
//! Input: UTF-8 text (invalid bytes replaced).

use crate::cli::size::{self, SizeError, MIN_SECTOR};

pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let want = reference(&text);
    let got = size::parse(&text);
    match (&got, &want) {
        (Ok(g), Ok(w)) => assert_eq!(g, w, "{text:?}"),
        (Err(SizeError::Fraction { whole, frac, .. }), Err(Want::Fraction(w, f))) => {
            assert_eq!((whole.to_string(), frac), (w.clone(), f), "{text:?}")
        }
        // A value that is too large may be named so before its fraction is looked at.
        (Err(SizeError::TooLarge(_)), Err(Want::Fraction(w, _))) => {
            assert!(above_u64(w), "{text:?} is {w}.x bytes, called too large")
        }
        (Err(e), Err(w)) => assert!(w.is(e), "{text:?}: {e:?}, the reference says {w:?}"),
        _ => panic!("{text:?}: parsed {got:?}, the reference says {want:?}"),
    }
    if let Ok(bytes) = got {
        derived(&text, bytes);
    }
}

#[derive(Debug)]
enum Want {
    Empty,
    Negative,
    Syntax,
    TooLarge,
    /// Not a whole number of bytes: the integer part and the fraction's digits (no
    /// trailing zeros), both in decimal.
    Fraction(String, String),
}

impl Want {
    fn is(&self, e: &SizeError) -> bool {
        matches!(
            (self, e),
            (Self::Empty, SizeError::Empty)
                | (Self::Negative, SizeError::Negative(_))
                | (Self::Syntax, SizeError::Syntax(_))
                | (Self::TooLarge, SizeError::TooLarge(_))
        )
    }
}

/// The documented grammar: white space around; digits with at most one `.` (at least one
/// digit, at most 20 after the point); optional white space; a unit: none or `B` (bytes),
/// or K, M, G, T (powers of 1024) alone or followed by `B` or `iB`, in any case.
fn reference(text: &str) -> Result<u64, Want> {
    let s = text.trim();
    if s.is_empty() {
        return Err(Want::Empty);
    }
    if s.starts_with('-') {
        return Err(Want::Negative);
    }
    let n = s
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let (number, unit) = s.split_at(n);
    let shift = shift_of(unit.trim_start()).ok_or(Want::Syntax)?;
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.len() + frac.len() == 0 || frac.contains('.') || frac.len() > 20 {
        return Err(Want::Syntax);
    }
    // All the digits as written, times 2^shift, in decimal; then the point put back.
    let mut digits: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
    for _ in 0..shift {
        double(&mut digits);
    }
    let point = digits.len() - frac.len();
    let whole = decimal(&digits[..point]);
    let fraction: String = digits[point..]
        .iter()
        .map(|d| char::from(b'0' + d))
        .collect();
    let fraction = fraction.trim_end_matches('0');
    if !fraction.is_empty() {
        return Err(Want::Fraction(whole, fraction.to_string()));
    }
    whole.parse::<u64>().map_err(|_| Want::TooLarge)
}

fn shift_of(unit: &str) -> Option<u32> {
    let u = unit.to_ascii_lowercase();
    if u.is_empty() || u == "b" {
        return Some(0);
    }
    let shift = match u.as_bytes().first()? {
        b'k' => 10,
        b'm' => 20,
        b'g' => 30,
        b't' => 40,
        _ => return None,
    };
    matches!(&u[1..], "" | "b" | "ib").then_some(shift)
}

/// Double a big-endian decimal number in place.
fn double(digits: &mut Vec<u8>) {
    let mut carry = 0;
    for d in digits.iter_mut().rev() {
        let v = *d * 2 + carry;
        *d = v % 10;
        carry = v / 10;
    }
    if carry != 0 {
        digits.insert(0, carry);
    }
}

/// Decimal digits as text, without leading zeros.
fn decimal(digits: &[u8]) -> String {
    let s: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
    match s.trim_start_matches('0') {
        "" => "0".into(),
        t => t.into(),
    }
}

fn above_u64(decimal: &str) -> bool {
    decimal.parse::<u64>().is_err()
}

/// `positive`, `disk`, `demo` and `human` for a text that parsed as `bytes`.
fn derived(text: &str, bytes: u64) {
    assert_eq!(
        size::parse(&size::human(bytes)),
        Ok(bytes),
        "human({bytes})"
    );
    human_is_largest_unit(bytes);
    match size::positive(text) {
        Ok(b) => assert!(b == bytes && b > 0),
        Err(e) => assert!(bytes == 0 && matches!(e, SizeError::Zero(_)), "{e:?}"),
    }
    match size::disk(text) {
        Ok(b) => assert!(b == bytes && b > 0 && b.is_multiple_of(MIN_SECTOR)),
        Err(SizeError::Zero(_)) => assert_eq!(bytes, 0),
        Err(SizeError::NotSectors {
            bytes: b, down, up, ..
        }) => {
            assert!(b == bytes && !b.is_multiple_of(MIN_SECTOR));
            // What the message suggests instead is a disk size, and the nearest ones.
            for s in [&down, &up] {
                let ok = size::disk(s);
                assert!(ok.is_ok(), "{text:?}: suggests {s:?}, which is {ok:?}");
            }
            // The sector multiples either side (only the one below near 2^64, only the one
            // above below 512).
            let lower = bytes / MIN_SECTOR * MIN_SECTOR;
            let next = u128::from(lower) + u128::from(MIN_SECTOR);
            let want_up = u64::try_from(next).unwrap_or(lower);
            let want_down = if lower == 0 { want_up } else { lower };
            assert_eq!(size::disk(&down), Ok(want_down), "{text:?}: down");
            assert_eq!(size::disk(&up), Ok(want_up), "{text:?}: up");
        }
        Err(e) => panic!("{text:?} parsed as {bytes} but disk() says {e:?}"),
    }
    let in_demo_range = (8 << 10..=1 << 30).contains(&bytes);
    match size::demo(text) {
        Ok(b) => assert!(b == bytes && in_demo_range),
        Err(SizeError::Range { .. }) => assert!(!in_demo_range && size::disk(text).is_ok()),
        Err(_) => assert!(size::disk(text).is_err()),
    }
}

/// `human` writes the largest of K, M, G, T that divides the size, or plain bytes.
fn human_is_largest_unit(bytes: u64) {
    let h = size::human(bytes);
    let (shift, letter) = [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')]
        .into_iter()
        .find(|(s, _)| bytes != 0 && bytes.is_multiple_of(1u64 << s))
        .unwrap_or((0, ' '));
    let want = match letter {
        ' ' => bytes.to_string(),
        l => format!("{}{l}", bytes >> shift),
    };
    assert_eq!(h, want);
}
