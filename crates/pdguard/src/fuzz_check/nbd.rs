//! The NBD handshake and request parsers (`nbd/wire.rs`) against a reference written
//! from proto.md: every `Frame` is checked against the byte layout (magic, lengths, the
//! bytes a message takes), whatever parsed is re-encoded and compared with the bytes it
//! came from, and `check` is compared with a reference that computes `offset + len` in
//! 128 bits.
//!
//! Input: one mode byte, then
//! - mode 0: the client's handshake stream: client flags, then options (each option's
//!   data also parsed as an INFO/GO and as a meta context request);
//! - mode 1: 8 bytes of session (export size: 6 bytes, flags, a maximum payload),
//!   then the transmission stream: request headers and WRITE payloads;
//! - mode 2: the data of one `NBD_OPT_INFO`/`NBD_OPT_GO`;
//! - mode 3: the data of one meta context option.

use crate::nbd::wire::{self, Command, Frame, Request, Session, WireError};

/// Maximum payloads the stream parsers are tried with: none, tiny, the server's default
/// (32 MiB) and unbounded.
const MAX_PAYLOADS: [u32; 6] = [0, 1, 512, 4096, 32 << 20, u32::MAX];

/// Messages parsed from one stream at most (the stream is short; this only bounds time).
const MAX_MESSAGES: usize = 4096;

pub fn check(data: &[u8]) {
    let (mode, rest) = super::split_mode(data);
    match mode % 4 {
        0 => handshake(rest),
        1 => transmission(rest),
        2 => info_request(rest),
        _ => meta_request(rest),
    }
}

fn be32(b: &[u8]) -> u32 {
    b.iter().take(4).fold(0, |v, &x| v << 8 | u32::from(x))
}

fn be64(b: &[u8]) -> u64 {
    b.iter().take(8).fold(0, |v, &x| v << 8 | u64::from(x))
}

/// A `Frame::Incomplete { need }` must ask for more than it has; a `Complete` must take
/// bytes it has, and parse the same from exactly those bytes (the parser looks at no
/// byte past the message) but not from one byte fewer.
fn frame_invariants<T: PartialEq + std::fmt::Debug, E: PartialEq + std::fmt::Debug>(
    buf: &[u8],
    parse: impl Fn(&[u8]) -> Result<Frame<T>, E>,
) {
    match parse(buf) {
        Ok(Frame::Incomplete { need }) => assert!(need > buf.len(), "need {need} <= {}", buf.len()),
        Ok(Frame::Complete(v, used)) => {
            assert!(
                used <= buf.len() && used > 0,
                "used {used} of {}",
                buf.len()
            );
            assert_eq!(parse(&buf[..used]), Ok(Frame::Complete(v, used)));
            assert!(
                matches!(parse(&buf[..used - 1]), Ok(Frame::Incomplete { .. })),
                "a message of {used} bytes parsed from {} bytes",
                used - 1
            );
        }
        Err(_) => {}
    }
}

fn handshake(buf: &[u8]) {
    let flags = wire::parse_client_flags(buf);
    if buf.len() < 4 {
        assert_eq!(flags, Ok(Frame::Incomplete { need: 4 }));
        return;
    }
    let f = be32(buf);
    let known = wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES;
    if f & !known != 0 {
        assert_eq!(flags, Err(WireError::ClientFlags(f)));
        return;
    }
    let want = wire::ClientFlags {
        fixed_newstyle: f & 1 != 0,
        no_zeroes: f & 2 != 0,
    };
    assert_eq!(flags, Ok(Frame::Complete(want, 4)));
    // The option limit is the server's; try a small one and the real one.
    let max = if f & 2 != 0 { 64 } else { 64 << 10 };
    options(&buf[4..], max);
}

fn options(mut buf: &[u8], max: u32) {
    for _ in 0..MAX_MESSAGES {
        frame_invariants(buf, |b| owned_option(b, max));
        let got = wire::parse_option(buf, max);
        if buf.len() < wire::OPTION_HEADER_LEN {
            assert_eq!(got, Ok(Frame::Incomplete { need: 16 }));
            return;
        }
        let (magic, code, len) = (be64(buf), be32(&buf[8..]), be32(&buf[12..]));
        if magic != wire::IHAVEOPT {
            assert_eq!(
                got,
                Err(WireError::BadMagic {
                    what: "option",
                    got: magic
                })
            );
            return;
        }
        if len > max {
            assert_eq!(got, Err(WireError::OptionTooLarge { code, len, max }));
            return;
        }
        let total = 16 + len as usize;
        let Ok(Frame::Complete(opt, used)) = got else {
            assert_eq!(got, Ok(Frame::Incomplete { need: total }));
            assert!(buf.len() < total);
            return;
        };
        assert_eq!((opt.code, used), (code, total));
        assert_eq!(wire::encode_option(opt.code, opt.data), &buf[..used]);
        info_request(opt.data);
        meta_request(opt.data);
        buf = &buf[used..];
    }
}

/// `parse_option` with the option's data copied, to compare parses of two slices.
fn owned_option(b: &[u8], max: u32) -> Result<Frame<(u32, Vec<u8>)>, WireError> {
    Ok(match wire::parse_option(b, max)? {
        Frame::Complete(o, used) => Frame::Complete((o.code, o.data.to_vec()), used),
        Frame::Incomplete { need } => Frame::Incomplete { need },
    })
}

/// A string as the spec allows it: at most 4096 bytes, no NUL (UTF-8 by its type).
fn valid_string(s: &str) -> bool {
    s.len() <= wire::MAX_STRING && !s.contains('\0')
}

fn info_request(data: &[u8]) {
    let got = wire::parse_info_request(data);
    // Reference: u32 name length, name, u16 count, exactly 2 bytes per request.
    let name_len = data.get(..4).map(|b| be32(b) as usize);
    let name = name_len.and_then(|n| data.get(4..4 + n));
    let name = name
        .and_then(|n| std::str::from_utf8(n).ok())
        .filter(|s| valid_string(s));
    let ok = name.is_some_and(|n| {
        let at = 4 + n.len();
        data.get(at..at + 2)
            .is_some_and(|c| data.len() - at - 2 == 2 * be32(c) as usize)
    });
    match got {
        Ok(r) => {
            assert!(ok, "info request accepted against the reference: {r:?}");
            assert!(valid_string(&r.name));
            assert_eq!(
                wire::encode_info_request(&r),
                data,
                "info request round trip"
            );
            replies(&r.name);
        }
        Err(e) => {
            assert!(!ok, "valid info request refused: {e}");
            assert!(!e.0.is_empty());
        }
    }
}

fn meta_request(data: &[u8]) {
    let got = wire::parse_meta_request(data);
    let ok = meta_reference(data);
    match got {
        Ok(r) => {
            assert!(ok, "meta request accepted against the reference: {r:?}");
            assert!(valid_string(&r.name) && r.queries.iter().all(|q| valid_string(q)));
            assert_eq!(
                wire::encode_meta_request(&r),
                data,
                "meta request round trip"
            );
            for list in [false, true] {
                let want = (list && r.queries.is_empty())
                    || r.queries.iter().any(|q| {
                        q.as_str() == wire::BASE_ALLOCATION || (list && q.as_str() == "base:")
                    });
                assert_eq!(wire::base_allocation_matches(&r.queries, list), want);
            }
        }
        Err(e) => assert!(!ok, "valid meta request refused: {e}"),
    }
}

/// u32 name length, name, u32 count, then count × (u32 length, string), nothing after.
fn meta_reference(data: &[u8]) -> bool {
    let mut at = 0usize;
    let string = |at: &mut usize| -> bool {
        let Some(len) = data.get(*at..*at + 4).map(be32) else {
            return false;
        };
        let end = *at + 4 + len as usize;
        let s = data
            .get(*at + 4..end)
            .and_then(|b| std::str::from_utf8(b).ok());
        *at = end;
        s.is_some_and(valid_string)
    };
    if !string(&mut at) {
        return false;
    }
    let Some(n) = data.get(at..at + 4).map(be32) else {
        return false;
    };
    at += 4;
    for _ in 0..n {
        if !string(&mut at) {
            return false;
        }
    }
    at == data.len()
}

/// The replies built from a client's string keep their length fields true and their
/// strings within the limit (`truncate` cuts on a character boundary).
fn replies(s: &str) {
    let long = s.repeat(1 + 5000 / (s.len() + 1));
    let e = wire::option_error(7, 1 << 31 | 3, &long);
    assert_eq!(be32(&e[16..]) as usize, e.len() - 20);
    assert!(e.len() - 20 <= wire::MAX_STRING && long.as_bytes().starts_with(&e[20..]));
    let c = wire::error_chunk(9, 5, &long);
    assert_eq!(be32(&c[16..]) as usize, c.len() - 20);
    assert_eq!(
        usize::from(u16::from_be_bytes([c[24], c[25]])),
        c.len() - 26
    );
    let srv = wire::rep_server(s, &long);
    assert_eq!(be32(&srv) as usize, s.len());
    assert!(srv.len() - 4 - s.len() <= wire::MAX_STRING);
}

fn transmission(data: &[u8]) {
    let (p, mut buf) = super::take::<8>(data);
    // Export sizes near 2^64 too, where `offset + len` overflows.
    let low = be64(&p[..6]);
    let session = Session {
        size: if p[6] & 4 != 0 { u64::MAX - low } else { low },
        structured: p[6] & 1 != 0,
        meta: p[6] & 2 != 0,
    };
    let max = MAX_PAYLOADS[usize::from(p[7]) % MAX_PAYLOADS.len()];
    for _ in 0..MAX_MESSAGES {
        frame_invariants(buf, |b| wire::parse_request(b, max));
        let Some(req) = request(buf, max) else {
            return;
        };
        assert_eq!(
            wire::check(&req, &session).map_err(|r| r.errno),
            check_reference(&req, &session)
        );
        if let Err(r) = wire::check(&req, &session) {
            assert!(!r.why.is_empty());
        }
        let used = 28
            + if req.cmd == Command::Write {
                req.len as usize
            } else {
                0
            };
        buf = &buf[used..];
    }
}

/// One request header checked against the layout; the request if it is complete.
fn request(buf: &[u8], max: u32) -> Option<Request> {
    let got = wire::parse_request(buf, max);
    if buf.len() < wire::REQUEST_LEN {
        assert_eq!(got, Ok(Frame::Incomplete { need: 28 }));
        return None;
    }
    let magic = be32(buf);
    if magic != wire::REQUEST_MAGIC {
        assert_eq!(
            got,
            Err(WireError::BadMagic {
                what: "request",
                got: u64::from(magic)
            })
        );
        return None;
    }
    let code = u16::from_be_bytes([buf[6], buf[7]]);
    let len = be32(&buf[24..]);
    let payload = matches!(code, 0 | 1) && len > max;
    if payload {
        assert!(
            matches!(got, Err(WireError::PayloadTooLarge { len: l, max: m, .. }) if l == len && m == max)
        );
        return None;
    }
    let used = 28 + if code == 1 { len as usize } else { 0 };
    let Ok(Frame::Complete(req, n)) = got else {
        assert_eq!(got, Ok(Frame::Incomplete { need: used }));
        assert!(buf.len() < used);
        return None;
    };
    assert_eq!(n, used);
    assert_eq!(req.cmd.code(), code);
    assert_eq!(Command::from_code(code), req.cmd);
    assert_eq!(req.encode(), buf[..28], "request header round trip");
    assert_eq!(req.cmd.writes(), matches!(code, 1 | 4 | 6));
    Some(req)
}

/// `check` from proto.md, with `offset + len` computed in 128 bits.
fn check_reference(r: &Request, s: &Session) -> Result<(), u32> {
    use wire::errno::{EINVAL, ENOSPC};
    let code = r.cmd.code();
    if code > 7 {
        return Err(EINVAL);
    }
    // Flags each command accepts: FUA everywhere; DF on a structured READ; NO_HOLE on
    // WRITE_ZEROES; REQ_ONE on BLOCK_STATUS; DISC ignores flags.
    let mut allowed = 1u16;
    match code {
        0 if s.structured => allowed |= 1 << 2,
        6 => allowed |= 1 << 1,
        7 => allowed |= 1 << 3,
        2 => allowed = u16::MAX,
        _ => {}
    }
    if r.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    match code {
        2 => return Ok(()),
        3 => {
            return if r.offset == 0 && r.len == 0 {
                Ok(())
            } else {
                Err(EINVAL)
            }
        }
        7 if !s.meta => return Err(EINVAL),
        _ => {}
    }
    if r.len == 0 {
        return Err(EINVAL);
    }
    if u128::from(r.offset) + u128::from(r.len) > u128::from(s.size) {
        return Err(if matches!(code, 1 | 6) {
            ENOSPC
        } else {
            EINVAL
        });
    }
    Ok(())
}
