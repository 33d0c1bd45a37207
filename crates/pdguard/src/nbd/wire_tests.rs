//! Unit tests and the fuzz target of the wire format: proptests over arbitrary byte streams
//! (bounded case counts, so they run in the normal test suite) and round trips.

#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;

const MAX: u32 = 32 << 20;

fn session(size: u64) -> Session {
    Session {
        size,
        structured: true,
        meta: true,
    }
}

#[test]
fn constants_match_the_spec() {
    // proto.md: "NBDMAGIC", "IHAVEOPT" in ASCII; reply and request magics.
    assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
    assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    assert_eq!(OPT_REPLY_MAGIC, 0x3e889045565a9);
    assert_eq!(rep::ERR_UNSUP, 2_147_483_649);
    assert_eq!(rep::ERR_UNKNOWN, (1 << 31) + 6);
    assert_eq!(reply::ERROR, 32769);
    let g = greeting();
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    assert_eq!(&g[16..], &[0, 3]);
}

#[test]
fn client_flags() {
    assert_eq!(
        parse_client_flags(&[0, 0, 0]).unwrap(),
        Frame::Incomplete { need: 4 }
    );
    assert_eq!(
        parse_client_flags(&[0, 0, 0, 3]).unwrap(),
        Frame::Complete(
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            },
            4
        )
    );
    assert_eq!(
        parse_client_flags(&[0, 0, 0, 4]).unwrap_err(),
        WireError::ClientFlags(4)
    );
}

#[test]
fn option_frames() {
    let o = encode_option(opt::GO, b"abc");
    for cut in 0..o.len() {
        assert!(matches!(
            parse_option(&o[..cut], 100).unwrap(),
            Frame::Incomplete { need } if need > cut
        ));
    }
    assert_eq!(
        parse_option(&o, 100).unwrap(),
        Frame::Complete(
            RawOption {
                code: opt::GO,
                data: b"abc"
            },
            o.len()
        )
    );
    assert_eq!(
        parse_option(&o, 2).unwrap_err(),
        WireError::OptionTooLarge {
            code: opt::GO,
            len: 3,
            max: 2
        }
    );
    let mut bad = o.clone();
    bad[0] = b'X';
    assert!(matches!(
        parse_option(&bad, 100),
        Err(WireError::BadMagic { .. })
    ));
}

#[test]
fn info_request_checks_every_length() {
    let ok = encode_info_request(&InfoRequest {
        name: "d1".into(),
        infos: vec![info::BLOCK_SIZE, info::NAME],
    });
    assert_eq!(parse_info_request(&ok).unwrap().infos, vec![3, 1]);
    // Name length larger than the data.
    let mut long = ok.clone();
    long[3] = 200;
    assert!(parse_info_request(&long).is_err());
    // One info request missing, one extra byte.
    assert!(parse_info_request(&ok[..ok.len() - 1]).is_err());
    let mut extra = ok.clone();
    extra.push(0);
    assert!(parse_info_request(&extra).is_err());
    // A name of more than 4096 bytes, a NUL, bad UTF-8.
    let big = encode_info_request(&InfoRequest {
        name: "x".repeat(4097),
        infos: vec![],
    });
    assert!(parse_info_request(&big).is_err());
    let nul = encode_info_request(&InfoRequest {
        name: "a\0b".into(),
        infos: vec![],
    });
    assert!(parse_info_request(&nul).is_err());
    let mut utf = encode_info_request(&InfoRequest {
        name: "ab".into(),
        infos: vec![],
    });
    utf[4] = 0xff;
    assert!(parse_info_request(&utf).is_err());
}

#[test]
fn meta_request_count_is_bounded_by_the_data() {
    let mut b = 0u32.to_be_bytes().to_vec();
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    let e = parse_meta_request(&b).unwrap_err();
    assert!(e.0.contains("cannot fit"), "{e}");
    let r = MetaRequest {
        name: "d".into(),
        queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
    };
    assert_eq!(parse_meta_request(&encode_meta_request(&r)).unwrap(), r);
}

#[test]
fn meta_context_matching() {
    let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(base_allocation_matches(&[], true));
    assert!(!base_allocation_matches(&[], false));
    assert!(base_allocation_matches(&q(&["base:"]), true));
    assert!(!base_allocation_matches(&q(&["base:"]), false));
    assert!(base_allocation_matches(
        &q(&["x:y", "base:allocation"]),
        false
    ));
    assert!(!base_allocation_matches(
        &q(&["qemu:allocation-depth"]),
        true
    ));
}

#[test]
fn request_frames_and_oversize() {
    let r = Request {
        flags: cmdflag::FUA,
        cmd: Command::Write,
        cookie: 7,
        offset: 4096,
        len: 3,
    };
    let mut b = r.encode().to_vec();
    assert_eq!(
        parse_request(&b, MAX).unwrap(),
        Frame::Incomplete { need: 31 }
    );
    b.extend_from_slice(b"xyz");
    assert_eq!(parse_request(&b, MAX).unwrap(), Frame::Complete(r, 31));
    let big = Request { len: MAX + 1, ..r };
    assert!(matches!(
        parse_request(&big.encode(), MAX),
        Err(WireError::PayloadTooLarge { .. })
    ));
    let read = Request {
        cmd: Command::Read,
        ..big
    };
    assert!(parse_request(&read.encode(), MAX).is_err());
    // TRIM and WRITE_ZEROES carry no payload: any length parses (and is range-checked).
    let trim = Request {
        cmd: Command::Trim,
        ..big
    };
    assert_eq!(
        parse_request(&trim.encode(), MAX).unwrap(),
        Frame::Complete(trim, 28)
    );
}

#[test]
fn checks_before_io() {
    let s = session(1 << 20);
    let req = |cmd, flags, offset, len| Request {
        flags,
        cmd,
        cookie: 1,
        offset,
        len,
    };
    assert!(check(&req(Command::Read, 0, 0, 512), &s).is_ok());
    assert!(check(&req(Command::Read, 0, (1 << 20) - 512, 512), &s).is_ok());
    let past = check(&req(Command::Read, 0, (1 << 20) - 511, 512), &s).unwrap_err();
    assert_eq!(past.errno, errno::EINVAL);
    let wpast = check(&req(Command::Write, 0, 1 << 20, 1), &s).unwrap_err();
    assert_eq!(wpast.errno, errno::ENOSPC);
    // offset + len overflows u64.
    assert_eq!(
        check(&req(Command::Read, 0, u64::MAX, 2), &s)
            .unwrap_err()
            .errno,
        errno::EINVAL
    );
    assert_eq!(
        check(&req(Command::Read, 0, 0, 0), &s).unwrap_err().errno,
        errno::EINVAL
    );
    assert_eq!(
        check(&req(Command::Unknown(99), 0, 0, 1), &s)
            .unwrap_err()
            .errno,
        errno::EINVAL
    );
    assert!(check(&req(Command::Write, cmdflag::NO_HOLE, 0, 1), &s).is_err());
    assert!(check(&req(Command::WriteZeroes, cmdflag::NO_HOLE, 0, 1), &s).is_ok());
    assert!(check(&req(Command::WriteZeroes, cmdflag::FAST_ZERO, 0, 1), &s).is_err());
    assert!(check(&req(Command::Flush, 0, 1, 0), &s).is_err());
    assert!(check(&req(Command::Flush, cmdflag::FUA, 0, 0), &s).is_ok());
    assert!(check(&req(Command::BlockStatus, cmdflag::REQ_ONE, 0, 1), &s).is_ok());
    let no_meta = Session { meta: false, ..s };
    assert!(check(&req(Command::BlockStatus, 0, 0, 1), &no_meta).is_err());
    let simple = Session {
        structured: false,
        ..s
    };
    assert!(check(&req(Command::Read, cmdflag::DF, 0, 1), &simple).is_err());
    assert!(check(&req(Command::Read, cmdflag::DF, 0, 1), &s).is_ok());
}

#[test]
fn reply_encodings() {
    assert_eq!(
        simple_reply(0x0102, 22),
        [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 1, 2]
    );
    let h = offset_data_header(9, 4096, 512);
    assert_eq!(&h[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&h[4..8], &[0, 1, 0, 1]); // DONE, OFFSET_DATA
    assert_eq!(&h[16..20], &520u32.to_be_bytes());
    assert_eq!(&h[20..], &4096u64.to_be_bytes());
    let e = error_chunk(9, errno::EPERM, "no");
    assert_eq!(&e[6..8], &reply::ERROR.to_be_bytes());
    assert_eq!(&e[16..20], &8u32.to_be_bytes());
    assert_eq!(&e[20..], &[0, 0, 0, 1, 0, 2, b'n', b'o']);
    let huge = error_chunk(1, errno::EIO, &"é".repeat(3000));
    assert_eq!(huge.len(), 26 + 4096);
    let bs = block_status_chunk(3, 1, &[(4096, 0), (8192, STATE_HOLE | STATE_ZERO)]);
    assert_eq!(&bs[16..20], &20u32.to_be_bytes());
    assert_eq!(&bs[32..], &[0, 0, 0x20, 0, 0, 0, 0, 3]);
    assert_eq!(export_name_reply(1, 2, false).len(), 134);
    assert_eq!(export_name_reply(1, 2, true).len(), 10);
    assert_eq!(info_export(5, 1).len(), 12);
    assert_eq!(info_block_size(1, 4096, MAX).len(), 14);
}

/// Parse a stream the way the connection does: handshake flags, then options until a
/// GO/EXPORT_NAME, then requests. Returns what was decoded, or the first fatal error.
fn drive(stream: &[u8]) -> (Vec<String>, Option<WireError>) {
    let mut out = Vec::new();
    let mut at = match parse_client_flags(stream) {
        Ok(Frame::Complete(_, n)) => n,
        Ok(Frame::Incomplete { need }) => {
            assert!(need > stream.len());
            return (out, None);
        }
        Err(e) => return (out, Some(e)),
    };
    loop {
        match parse_option(&stream[at..], 4096) {
            Ok(Frame::Complete(o, n)) => {
                assert!(n >= OPTION_HEADER_LEN && at + n <= stream.len());
                at += n;
                let _ = parse_info_request(o.data);
                let _ = parse_meta_request(o.data);
                out.push(format!("opt {}", o.code));
                if o.code == opt::GO || o.code == opt::EXPORT_NAME {
                    break;
                }
            }
            Ok(Frame::Incomplete { need }) => {
                assert!(at + need > stream.len());
                return (out, None);
            }
            Err(e) => return (out, Some(e)),
        }
    }
    loop {
        match parse_request(&stream[at..], 1 << 16) {
            Ok(Frame::Complete(r, n)) => {
                assert!(n >= REQUEST_LEN && at + n <= stream.len());
                at += n;
                let _ = check(&r, &session(1 << 30));
                out.push(format!("req {:?}", r));
            }
            Ok(Frame::Incomplete { need }) => {
                assert!(at + need > stream.len());
                return (out, None);
            }
            Err(e) => return (out, Some(e)),
        }
    }
}

/// A stream that gets past the handshake often: valid framing with random contents.
fn framed_stream() -> impl Strategy<Value = Vec<u8>> {
    // Any option but the two that end the handshake (those come last).
    let opt = (0u32..13, proptest::collection::vec(any::<u8>(), 0..64))
        .prop_filter("not GO or EXPORT_NAME", |(c, _)| {
            *c != opt::GO && *c != opt::EXPORT_NAME
        })
        .prop_map(|(c, d)| encode_option(c, &d));
    let req = (
        0u16..10,
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        0u32..300,
    )
        .prop_map(|(c, f, k, o, l)| {
            let r = Request {
                flags: f,
                cmd: Command::from_code(c),
                cookie: k,
                offset: o,
                len: l,
            };
            let mut b = r.encode().to_vec();
            if r.cmd == Command::Write {
                b.resize(b.len() + l as usize, 0xab);
            }
            b
        });
    (
        proptest::collection::vec(opt, 0..4),
        proptest::collection::vec(req, 0..8),
        any::<bool>(),
    )
        .prop_map(|(opts, reqs, export_name)| {
            let mut s = 3u32.to_be_bytes().to_vec();
            for o in opts {
                s.extend_from_slice(&o);
            }
            let go = if export_name {
                opt::EXPORT_NAME
            } else {
                opt::GO
            };
            s.extend_from_slice(&encode_option(go, b"d"));
            for r in reqs {
                s.extend_from_slice(&r);
            }
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Fuzz target: no byte stream makes the parsers panic, over-read or claim to use
    /// more bytes than they were given.
    #[test]
    fn arbitrary_bytes_never_panic(stream in proptest::collection::vec(any::<u8>(), 0..512)) {
        drive(&stream);
    }

    /// The same on streams that reach the transmission phase, with every flip of one byte.
    #[test]
    fn framed_streams_with_a_flipped_byte(s in framed_stream(), at in any::<prop::sample::Index>(), x in any::<u8>()) {
        let (decoded, err) = drive(&s);
        prop_assert!(err.is_none());
        prop_assert!(decoded.iter().any(|d| d.starts_with("opt")));
        let mut m = s.clone();
        let i = at.index(m.len());
        m[i] ^= x;
        drive(&m);
    }

    /// Any prefix of a valid stream decodes to a prefix of what the whole stream decodes to:
    /// a message cut short is "incomplete", never an error or a different message.
    #[test]
    fn prefixes_are_incomplete_not_errors(s in framed_stream(), cut in any::<prop::sample::Index>()) {
        let (whole, _) = drive(&s);
        let (part, err) = drive(&s[..cut.index(s.len() + 1)]);
        prop_assert!(err.is_none());
        prop_assert!(part.len() <= whole.len());
        prop_assert_eq!(&whole[..part.len()], &part[..]);
    }

    #[test]
    fn requests_round_trip(flags in any::<u16>(), code in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(), len in 0u32..4096) {
        let r = Request { flags, cmd: Command::from_code(code), cookie, offset, len };
        let mut b = r.encode().to_vec();
        b.resize(b.len() + len as usize, 0);
        match parse_request(&b, 4096).unwrap() {
            Frame::Complete(got, n) => {
                prop_assert_eq!(got, r);
                prop_assert!(n == 28 || (r.cmd == Command::Write && n == 28 + len as usize));
            }
            Frame::Incomplete { .. } => prop_assert!(false, "a whole request is complete"),
        }
    }

    #[test]
    fn info_and_meta_round_trip(name in "[a-z0-9._-]{0,40}", infos in proptest::collection::vec(any::<u16>(), 0..8), queries in proptest::collection::vec("[a-z]{1,8}:[a-z]{0,12}", 0..5)) {
        let i = InfoRequest { name: name.clone(), infos };
        prop_assert_eq!(parse_info_request(&encode_info_request(&i)).unwrap(), i);
        let m = MetaRequest { name, queries };
        prop_assert_eq!(parse_meta_request(&encode_meta_request(&m)).unwrap(), m);
    }

    /// `check` accepts a READ exactly when it is nonempty and inside the export.
    #[test]
    fn check_is_the_range_rule(size in any::<u64>(), offset in any::<u64>(), len in any::<u32>()) {
        let r = Request { flags: 0, cmd: Command::Read, cookie: 0, offset, len };
        let inside = len > 0 && (offset as u128 + len as u128) <= size as u128;
        prop_assert_eq!(check(&r, &session(size)).is_ok(), inside);
    }
}

#[test]
fn request_headers_alone_take_any_length() {
    let w = Request {
        flags: 0,
        cmd: Command::Write,
        cookie: 5,
        offset: 0,
        len: u32::MAX,
    };
    let b = w.encode();
    assert_eq!(
        parse_request_header(&b).unwrap(),
        Frame::Complete(w, REQUEST_LEN)
    );
    assert_eq!(
        parse_request_header(&b[..27]).unwrap(),
        Frame::Incomplete { need: REQUEST_LEN }
    );
    assert!(parse_request_header(&[0u8; 28]).is_err());
    // The buffering parser still refuses what it cannot buffer.
    assert!(parse_request(&b, 1 << 20).is_err());
}
