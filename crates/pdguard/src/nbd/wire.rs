//! The NBD wire format (`doc/proto.md` of NetworkBlockDevice/nbd): the fixed newstyle
//! handshake, options and their replies, transmission requests, simple and structured
//! replies. Pure code: no I/O, no tokio. Every parser takes the bytes received so far and
//! answers `Frame::Incomplete` when more are needed (a normal result, not an error), checks
//! every length before it trusts it, and never allocates more than the bytes it was given.
//!
//! All integers are big-endian ("network byte order", proto.md "Conventions").
//!
//! The constants are the spec's whole table and the client-side encoders serve the tests,
//! so not every item has a caller in the server.
#![allow(dead_code)]

use thiserror::Error;

// Magic numbers (proto.md "Newstyle negotiation", "Request message", "Simple reply
// message", "Structured reply chunk message").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (proto.md "Transmission flags").
pub mod tflag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option codes (proto.md "Option types").
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (proto.md "Option reply types").
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR + 1;
    pub const ERR_POLICY: u32 = ERR + 2;
    pub const ERR_INVALID: u32 = ERR + 3;
    pub const ERR_PLATFORM: u32 = ERR + 4;
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR + 8;
    pub const ERR_TOO_BIG: u32 = ERR + 9;
}

/// Information types of `NBD_REP_INFO`.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command flags (proto.md "Command flags").
pub mod cmdflag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod reply {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// Error values (proto.md "Error values").
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Strings (export names, queries, messages) "MUST be no longer than 4096 bytes".
pub const MAX_STRING: usize = 4096;
/// Request header length.
pub const REQUEST_LEN: usize = 28;
/// Simple reply header length (magic, error, cookie).
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header length (magic, flags, type, cookie, length).
pub const CHUNK_HEADER_LEN: usize = 20;
/// An `NBD_REPLY_TYPE_OFFSET_DATA` chunk's header and offset, before its data.
pub const OFFSET_DATA_HEADER_LEN: usize = CHUNK_HEADER_LEN + 8;
/// Option header length (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Zero padding after an `NBD_OPT_EXPORT_NAME` reply without `NO_ZEROES`.
pub const EXPORT_NAME_PAD: usize = 124;

/// The result of parsing a prefix of a byte stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<T> {
    /// A whole message: its value and how many bytes it took.
    Complete(T, usize),
    /// Not enough bytes yet; `need` is the least total length that could complete it.
    Incomplete { need: usize },
}

/// A violation after which the stream cannot be trusted: the connection is closed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad {what} magic {got:#x}; not an NBD client")]
    BadMagic { what: &'static str, got: u64 },
    #[error("client flags {0:#x} include flags this server did not offer")]
    ClientFlags(u32),
    #[error("option {code} carries {len} bytes, more than the limit of {max}")]
    OptionTooLarge { code: u32, len: u32, max: u32 },
    #[error("{cmd} request of {len} bytes is larger than the maximum payload {max}")]
    PayloadTooLarge {
        cmd: &'static str,
        len: u32,
        max: u32,
    },
}

/// An option's data was malformed: answered with `NBD_REP_ERR_INVALID` and this text.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(s: impl Into<String>) -> Invalid {
    Invalid(s.into())
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

// ---- handshake ------------------------------------------------------------------------

/// The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// What the client said in its 32-bit flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// The client's flags; unknown flags close the connection (proto.md "Client flags").
pub fn parse_client_flags(buf: &[u8]) -> Result<Frame<ClientFlags>, WireError> {
    if buf.len() < 4 {
        return Ok(Frame::Incomplete { need: 4 });
    }
    let f = be_u32(buf, 0);
    if f & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(WireError::ClientFlags(f));
    }
    Ok(Frame::Complete(
        ClientFlags {
            fixed_newstyle: f & FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: f & FLAG_C_NO_ZEROES != 0,
        },
        4,
    ))
}

/// One option as sent: its code and data.
#[derive(Debug, PartialEq, Eq)]
pub struct RawOption<'a> {
    pub code: u32,
    pub data: &'a [u8],
}

/// An option header and its data, at most `max` bytes of data.
pub fn parse_option(buf: &[u8], max: u32) -> Result<Frame<RawOption<'_>>, WireError> {
    if buf.len() < OPTION_HEADER_LEN {
        return Ok(Frame::Incomplete {
            need: OPTION_HEADER_LEN,
        });
    }
    let magic = be_u64(buf, 0);
    if magic != IHAVEOPT {
        return Err(WireError::BadMagic {
            what: "option",
            got: magic,
        });
    }
    let code = be_u32(buf, 8);
    let len = be_u32(buf, 12);
    if len > max {
        return Err(WireError::OptionTooLarge { code, len, max });
    }
    let total = OPTION_HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(Frame::Incomplete { need: total });
    }
    Ok(Frame::Complete(
        RawOption {
            code,
            data: &buf[OPTION_HEADER_LEN..total],
        },
        total,
    ))
}

/// Reads length-prefixed fields out of an option's data, every length checked.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }
    fn left(&self) -> usize {
        self.data.len() - self.at
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Invalid> {
        if self.left() < n {
            return Err(invalid(format!(
                "{what} needs {n} bytes but only {} are left in the option",
                self.left()
            )));
        }
        let s = &self.data[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u16(&mut self, what: &str) -> Result<u16, Invalid> {
        Ok(be_u16(self.take(2, what)?, 0))
    }
    fn u32(&mut self, what: &str) -> Result<u32, Invalid> {
        Ok(be_u32(self.take(4, what)?, 0))
    }
    /// A string of `len` bytes: UTF-8, no NUL, at most 4096 bytes.
    fn string(&mut self, len: u32, what: &str) -> Result<String, Invalid> {
        if len as usize > MAX_STRING {
            return Err(invalid(format!(
                "{what} is {len} bytes long; the limit is {MAX_STRING}"
            )));
        }
        let b = self.take(len as usize, what)?;
        let s = std::str::from_utf8(b).map_err(|_| invalid(format!("{what} is not UTF-8")))?;
        if s.contains('\0') {
            return Err(invalid(format!("{what} contains a NUL character")));
        }
        Ok(s.to_string())
    }
    fn end(&self, what: &str) -> Result<(), Invalid> {
        match self.left() {
            0 => Ok(()),
            n => Err(invalid(format!("{n} stray bytes after the {what}"))),
        }
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, Invalid> {
    let mut c = Cursor::new(data);
    let len = c.u32("export name length")?;
    let name = c.string(len, "export name")?;
    let n = c.u16("number of information requests")?;
    // Bounded by the option's length: 2 bytes per request, checked before reading.
    if c.left() != 2 * n as usize {
        return Err(invalid(format!(
            "{n} information requests need {} bytes, the option holds {}",
            2 * n as usize,
            c.left()
        )));
    }
    let mut infos = Vec::with_capacity(n as usize);
    for _ in 0..n {
        infos.push(c.u16("information request")?);
    }
    Ok(InfoRequest { name, infos })
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, Invalid> {
    let mut c = Cursor::new(data);
    let len = c.u32("export name length")?;
    let name = c.string(len, "export name")?;
    let n = c.u32("number of queries")?;
    // Each query takes at least 4 bytes: the count cannot exceed what was sent.
    if n as usize > c.left() / 4 {
        return Err(invalid(format!(
            "{n} queries cannot fit in the {} bytes left in the option",
            c.left()
        )));
    }
    let mut queries = Vec::new();
    for _ in 0..n {
        let qlen = c.u32("query length")?;
        queries.push(c.string(qlen, "query")?);
    }
    c.end("queries")?;
    Ok(MetaRequest { name, queries })
}

/// Which of `queries` name `base:allocation`: for LIST, an empty list or the `base:`
/// wildcard lists it; for SET, only its exact name selects it (proto.md "The `base:`
/// metadata namespace"). Queries of unknown namespaces are ignored.
pub fn base_allocation_matches(queries: &[String], list: bool) -> bool {
    if list && queries.is_empty() {
        return true;
    }
    queries
        .iter()
        .any(|q| q == BASE_ALLOCATION || (list && q == "base:"))
}

/// A fixed-newstyle option reply: magic, option, type, length, data.
pub fn option_reply(code: u32, rtype: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&rtype.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// An error reply with a message (truncated to the string limit).
pub fn option_error(code: u32, rtype: u32, msg: &str) -> Vec<u8> {
    option_reply(code, rtype, truncate(msg).as_bytes())
}

fn truncate(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `NBD_REP_SERVER` data: the export name, then a description.
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(truncate(description).as_bytes());
    b
}

/// `NBD_INFO_EXPORT` data.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&info::EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` data.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut b = kind.to_be_bytes().to_vec();
    b.extend_from_slice(truncate(s).as_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE` data.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = info::BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b
}

/// `NBD_REP_META_CONTEXT` data.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124 zero bytes unless
/// the client negotiated `NO_ZEROES`.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(10 + EXPORT_NAME_PAD);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.resize(10 + EXPORT_NAME_PAD, 0);
    }
    b
}

// ---- transmission ---------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_code(c: u16) -> Self {
        match c {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Disc,
            3 => Self::Flush,
            4 => Self::Trim,
            5 => Self::Cache,
            6 => Self::WriteZeroes,
            7 => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    pub fn code(self) -> u16 {
        match self {
            Self::Read => 0,
            Self::Write => 1,
            Self::Disc => 2,
            Self::Flush => 3,
            Self::Trim => 4,
            Self::Cache => 5,
            Self::WriteZeroes => 6,
            Self::BlockStatus => 7,
            Self::Unknown(c) => c,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "READ",
            Self::Write => "WRITE",
            Self::Disc => "DISC",
            Self::Flush => "FLUSH",
            Self::Trim => "TRIM",
            Self::Cache => "CACHE",
            Self::WriteZeroes => "WRITE_ZEROES",
            Self::BlockStatus => "BLOCK_STATUS",
            Self::Unknown(_) => "unknown",
        }
    }

    /// Whether the command changes the disk (the gate treats it as a write).
    pub fn writes(self) -> bool {
        matches!(self, Self::Write | Self::Trim | Self::WriteZeroes)
    }
}

/// A request header. A `WRITE`'s payload is the `len` bytes after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: Command,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// The request header as a client sends it (for tests and tools).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.code().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A request header and, for `WRITE`, its whole payload (bytes `28..used` of `buf`).
/// A `READ` or `WRITE` longer than `max_payload` is an error, for a caller that buffers
/// whole payloads. (The server parses headers alone with [`parse_request_header`] and
/// streams larger payloads.)
pub fn parse_request(buf: &[u8], max_payload: u32) -> Result<Frame<Request>, WireError> {
    let req = match parse_request_header(buf)? {
        Frame::Complete(req, _) => req,
        Frame::Incomplete { need } => return Ok(Frame::Incomplete { need }),
    };
    if matches!(req.cmd, Command::Read | Command::Write) && req.len > max_payload {
        return Err(WireError::PayloadTooLarge {
            cmd: req.cmd.name(),
            len: req.len,
            max: max_payload,
        });
    }
    let used = if req.cmd == Command::Write {
        REQUEST_LEN + req.len as usize
    } else {
        REQUEST_LEN
    };
    if buf.len() < used {
        return Ok(Frame::Incomplete { need: used });
    }
    Ok(Frame::Complete(req, used))
}

/// A request header alone (28 bytes); a `WRITE`'s `len` bytes of payload follow it on the
/// stream, of any length: the caller reads, streams or discards them.
pub fn parse_request_header(buf: &[u8]) -> Result<Frame<Request>, WireError> {
    if buf.len() < REQUEST_LEN {
        return Ok(Frame::Incomplete { need: REQUEST_LEN });
    }
    let magic = be_u32(buf, 0);
    if magic != REQUEST_MAGIC {
        return Err(WireError::BadMagic {
            what: "request",
            got: u64::from(magic),
        });
    }
    let req = Request {
        flags: be_u16(buf, 4),
        cmd: Command::from_code(be_u16(buf, 6)),
        cookie: be_u64(buf, 8),
        offset: be_u64(buf, 16),
        len: be_u32(buf, 24),
    };
    Ok(Frame::Complete(req, REQUEST_LEN))
}

/// What the transmission phase agreed on, for checking requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub size: u64,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub meta: bool,
}

/// A request the server refuses without touching the disk: the error and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub errno: u32,
    pub why: String,
}

fn refuse(errno: u32, why: String) -> Result<(), Refusal> {
    Err(Refusal { errno, why })
}

/// Check a request against the session before any I/O: known command, flags valid for
/// it, a nonzero length, and `offset + len` within the export (computed without overflow).
/// Writes and zeroes past the end get `ENOSPC`, everything else (TRIM included) `EINVAL`
/// (proto.md "Error values").
pub fn check(req: &Request, s: &Session) -> Result<(), Refusal> {
    use cmdflag::*;
    let allowed = match req.cmd {
        Command::Read if s.structured => FUA | DF,
        Command::Read | Command::Write | Command::Trim | Command::Cache | Command::Flush => FUA,
        Command::WriteZeroes => FUA | NO_HOLE,
        Command::BlockStatus => FUA | REQ_ONE,
        Command::Disc => u16::MAX,
        Command::Unknown(c) => return refuse(errno::EINVAL, format!("unknown command {c}")),
    };
    if req.flags & !allowed != 0 {
        return refuse(
            errno::EINVAL,
            format!(
                "flags {:#x} are not valid for {}",
                req.flags & !allowed,
                req.cmd.name()
            ),
        );
    }
    match req.cmd {
        Command::Disc => return Ok(()),
        Command::Flush if req.offset != 0 || req.len != 0 => {
            return refuse(errno::EINVAL, "FLUSH must have offset and length 0".into())
        }
        Command::Flush => return Ok(()),
        Command::BlockStatus if !s.meta => {
            return refuse(
                errno::EINVAL,
                "BLOCK_STATUS needs base:allocation selected with NBD_OPT_SET_META_CONTEXT".into(),
            )
        }
        _ => {}
    }
    if req.len == 0 {
        return refuse(errno::EINVAL, format!("{} of length 0", req.cmd.name()));
    }
    let end = req.offset.checked_add(u64::from(req.len));
    if end.is_none_or(|e| e > s.size) {
        let code = if matches!(req.cmd, Command::Write | Command::WriteZeroes) {
            errno::ENOSPC
        } else {
            errno::EINVAL
        };
        return refuse(
            code,
            format!(
                "{} of {} bytes at offset {} goes past the end of the export ({} bytes)",
                req.cmd.name(),
                req.len,
                req.offset,
                s.size
            ),
        );
    }
    Ok(())
}

/// A simple reply header (followed by the data of a successful simple `READ`).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header.
pub fn chunk_header(flags: u16, rtype: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&rtype.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// The final `NBD_REPLY_TYPE_OFFSET_DATA` chunk's header and offset; `data_len` bytes
/// follow. `data_len` is at most the maximum payload, so `8 + data_len` fits in 32 bits.
pub fn offset_data_header(cookie: u64, offset: u64, data_len: u32) -> [u8; 28] {
    offset_data_chunk(reply::FLAG_DONE, cookie, offset, data_len)
}

/// An `NBD_REPLY_TYPE_OFFSET_DATA` chunk's header and offset, final or not (`flags`), for
/// `data_len` bytes (at most `u32::MAX - 8`) that follow.
pub fn offset_data_chunk(flags: u16, cookie: u64, offset: u64, data_len: u32) -> [u8; 28] {
    let mut b = [0u8; OFFSET_DATA_HEADER_LEN];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        flags,
        reply::OFFSET_DATA,
        cookie,
        data_len.saturating_add(8),
    ));
    b[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// The final `NBD_REPLY_TYPE_NONE` chunk.
pub fn none_chunk(cookie: u64) -> [u8; 20] {
    chunk_header(reply::FLAG_DONE, reply::NONE, cookie, 0)
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a message.
pub fn error_chunk(cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    let msg = truncate(msg).as_bytes();
    let mut b = Vec::with_capacity(26 + msg.len());
    b.extend_from_slice(&chunk_header(
        reply::FLAG_DONE,
        reply::ERROR,
        cookie,
        6 + msg.len() as u32,
    ));
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// A final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one context: `(length, flags)` extents.
pub fn block_status_chunk(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut b = Vec::with_capacity(20 + len);
    b.extend_from_slice(&chunk_header(
        reply::FLAG_DONE,
        reply::BLOCK_STATUS,
        cookie,
        len as u32,
    ));
    b.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        b.extend_from_slice(&l.to_be_bytes());
        b.extend_from_slice(&f.to_be_bytes());
    }
    b
}

/// An option as a client sends it (for tests and tools).
pub fn encode_option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data as a client sends it.
pub fn encode_info_request(r: &InfoRequest) -> Vec<u8> {
    let mut b = (r.name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(r.name.as_bytes());
    b.extend_from_slice(&(r.infos.len() as u16).to_be_bytes());
    for i in &r.infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// Meta context option data as a client sends it.
pub fn encode_meta_request(r: &MetaRequest) -> Vec<u8> {
    let mut b = (r.name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(r.name.as_bytes());
    b.extend_from_slice(&(r.queries.len() as u32).to_be_bytes());
    for q in &r.queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
