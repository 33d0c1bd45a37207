//! Who may talk to the admin API, and how.
//!
//! - On loopback TCP every request needs `Authorization: Bearer TOKEN`, the token being the
//!   contents of the daemon's token file (default `STATE/api-token`: 32 random bytes in hex,
//!   mode 0600, made on first start). Any local user can connect to a loopback port; only
//!   the daemon's user (and root) can read the token.
//! - On loopback TCP the `Host` header must name a loopback host (`127.0.0.1`, `localhost`,
//!   `[::1]`, with or without a port): a web page whose name was rebound to 127.0.0.1 sends
//!   its own name.
//! - On both transports, a request that has a body or declares a content type must be
//!   `application/json`: a web page can post `text/plain` or a form anywhere without a
//!   CORS preflight, but not JSON.
//! - The unix socket (mode 0600 in a 0700 state directory) needs no token: reaching it is
//!   already proof of being the daemon's user.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use thiserror::Error;
use zeroize::Zeroizing;

use pdguard_engine::store::safe_open::{self, How};

use super::server::ApiError;

/// The environment variable that names the token file for the clients.
pub const TOKEN_FILE_ENV: &str = "PDGUARD_API_TOKEN_FILE";
/// The token file's name in the state directory.
pub const TOKEN_FILE_NAME: &str = "api-token";
/// Random bytes in a token made by the daemon.
const TOKEN_BYTES: usize = 32;
/// Shortest token accepted from a file (hex of 16 bytes).
const MIN_TOKEN_CHARS: usize = 32;
/// Longest token file read.
const MAX_TOKEN_FILE: u64 = 4096;

#[derive(Debug, Error)]
pub enum TokenError {
    #[error("API token file {path} can be read or written by group or others (mode {mode:04o}); run `chmod 600 {path}`")]
    Exposed { path: String, mode: u32 },
    #[error("API token file {path} belongs to uid {owner}, not to the daemon's user (uid {me}); run `chown {me} {path}` or remove it so that a new one is made")]
    Owner { path: String, owner: u32, me: u32 },
    /// A symbolic link, a FIFO, a device ([`safe_open`]): refused before a byte is read.
    #[error(transparent)]
    NotAFile(safe_open::SafeOpenError),
    #[error("API token file {path} does not hold a token (one line of at least {MIN_TOKEN_CHARS} printable characters, no spaces); remove it so that the daemon makes a new one")]
    Malformed { path: String },
    #[error("no API token file at {path}; the TCP API needs the daemon's token: pass --api-token-file FILE or set {TOKEN_FILE_ENV} (the daemon keeps it in STATE/{TOKEN_FILE_NAME})")]
    Missing { path: String },
    #[error("cannot {op} API token file {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// A bearer token. Compared through BLAKE3 hashes, whose equality is constant-time (and
/// hides the length).
#[derive(Clone)]
pub struct Token(Arc<Zeroizing<String>>);

impl Token {
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    fn matches(&self, given: &[u8]) -> bool {
        blake3::hash(given) == blake3::hash(self.0.as_bytes())
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TokenError + 'a {
    move |source| TokenError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// The daemon's token: load `path`, or make it (0600, `O_EXCL`) if it does not exist.
/// Refuses a file that group or others can read or write, or that another user owns.
pub fn load_or_create(path: &Path) -> Result<Token, TokenError> {
    let token = Zeroizing::new(hex::encode(rand::random::<[u8; TOKEN_BYTES]>()));
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
    {
        Ok(mut f) => {
            // The umask cannot widen 0600, but an inherited default ACL could.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .and_then(|()| f.write_all(format!("{}\n", token.as_str()).as_bytes()))
                .and_then(|()| f.sync_all())
                .map_err(io_err("write", path))?;
            tracing::info!(path = %path.display(), "made a new API token file");
            Ok(Token(Arc::new(token)))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => load(path, true),
        Err(e) => Err(io_err("create", path)(e)),
    }
}

/// Read a token file. With `strict` (the daemon), refuse a file that is group/other
/// accessible or not owned by this process's user.
pub fn load(path: &Path, strict: bool) -> Result<Token, TokenError> {
    let shown = || path.display().to_string();
    // Never through a symbolic link, never waiting on a FIFO: refused before a byte is read.
    let f = match safe_open::open(path, "API token file", How::READ) {
        Ok(Some(f)) => f,
        Ok(None) => return Err(TokenError::Missing { path: shown() }),
        Err(e) => return Err(TokenError::NotAFile(e)),
    };
    let meta = f.metadata().map_err(io_err("read", path))?;
    if strict {
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TokenError::Exposed {
                path: shown(),
                mode,
            });
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(TokenError::Owner {
                path: shown(),
                owner: meta.uid(),
                me,
            });
        }
    }
    read_token(f, path)
}

fn read_token(f: File, path: &Path) -> Result<Token, TokenError> {
    let mut text = Zeroizing::new(String::new());
    f.take(MAX_TOKEN_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => TokenError::Malformed {
                path: path.display().to_string(),
            },
            _ => io_err("read", path)(e),
        })?;
    let t = text.trim();
    if text.len() as u64 > MAX_TOKEN_FILE
        || t.len() < MIN_TOKEN_CHARS
        || !t.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(TokenError::Malformed {
            path: path.display().to_string(),
        });
    }
    Ok(Token(Arc::new(Zeroizing::new(t.to_string()))))
}

/// The token file a client uses: `--api-token-file`, else `$PDGUARD_API_TOKEN_FILE`, else
/// `STATE/api-token`.
pub fn client_token_file(flag: Option<&Path>, state: &Path) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os(TOKEN_FILE_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| state.join(TOKEN_FILE_NAME))
}

/// What the server checks, per listener.
#[derive(Clone)]
pub struct Guard {
    /// `Some` on TCP: the bearer token every request needs, and the Host check.
    pub tcp_token: Option<Token>,
    /// Where the token lives, for the error message.
    pub token_file: Option<PathBuf>,
}

/// The middleware of every request: Host, token, content type, in this order.
pub async fn check(State(g): State<Guard>, req: Request, next: Next) -> Response {
    match admit(&g, req.method(), req.uri(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn admit(g: &Guard, method: &Method, uri: &axum::http::Uri, h: &HeaderMap) -> Result<(), Refusal> {
    if let Some(token) = &g.tcp_token {
        check_host(uri, h)?;
        check_token(token, g.token_file.as_deref(), h)?;
    }
    check_content_type(method, h)
}

/// A refusal: an [`ApiError`], with `WWW-Authenticate` on a 401.
struct Refusal {
    err: ApiError,
    challenge: bool,
}

impl From<ApiError> for Refusal {
    fn from(err: ApiError) -> Self {
        Self {
            err,
            challenge: false,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut r = self.err.into_response();
        if self.challenge {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"pdguard\""),
            );
        }
        r
    }
}

/// Is `host` (a Host header or URI authority) a loopback name, with an optional port?
pub fn is_loopback_host(host: &str) -> bool {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, "")) => ip == "::1",
            Some((ip, port)) => ip == "::1" && port.strip_prefix(':').is_some_and(valid_port),
            None => false,
        };
    }
    let name = match host.split_once(':') {
        Some((name, port)) if valid_port(port) => name,
        Some(_) => return false,
        None => host,
    };
    name == "127.0.0.1" || name.eq_ignore_ascii_case("localhost")
}

fn valid_port(p: &str) -> bool {
    !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
}

fn check_host(uri: &axum::http::Uri, h: &HeaderMap) -> Result<(), Refusal> {
    let hosts = h.get_all(header::HOST).iter().collect::<Vec<_>>();
    let host = match hosts.as_slice() {
        [one] => one.to_str().unwrap_or(""),
        [] => {
            return Err(ApiError::new(
                400,
                "bad_host",
                "the request has no Host header; send Host: 127.0.0.1:PORT".into(),
            )
            .into())
        }
        _ => {
            return Err(ApiError::new(
                400,
                "bad_host",
                "the request has more than one Host header; send one".into(),
            )
            .into())
        }
    };
    let authority = uri.authority().map(|a| a.as_str());
    for name in std::iter::once(host).chain(authority) {
        if !is_loopback_host(name) {
            return Err(ApiError::new(
                421,
                "bad_host",
                format!(
                    "host {name:?} is not a loopback name; the TCP admin API answers only Host: 127.0.0.1, localhost or [::1] (with the port)"
                ),
            )
            .into());
        }
    }
    Ok(())
}

fn check_token(token: &Token, file: Option<&Path>, h: &HeaderMap) -> Result<(), Refusal> {
    let where_ = file.map_or_else(
        || format!("STATE/{TOKEN_FILE_NAME}"),
        |p| p.display().to_string(),
    );
    let given = h.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    let ok = given
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110 §11.1).
            (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..])
        })
        .is_some_and(|t| token.matches(t));
    if ok {
        return Ok(());
    }
    let why = if given.is_some() {
        "the bearer token is wrong"
    } else {
        "the request has no Authorization header"
    };
    Err(Refusal {
        err: ApiError::new(
            401,
            "unauthorized",
            format!(
                "{why}: the TCP admin API needs `Authorization: Bearer TOKEN` with the token in {where_}; the pdguard clients send it given --api-token-file FILE or {TOKEN_FILE_ENV}"
            ),
        ),
        challenge: true,
    })
}

fn check_content_type(method: &Method, h: &HeaderMap) -> Result<(), Refusal> {
    let declared = h.get(header::CONTENT_TYPE);
    let has_body = h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if declared.is_none() && !has_body {
        return Ok(());
    }
    let json = declared.and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if json {
        return Ok(());
    }
    let got = declared.map_or_else(
        || "no Content-Type".to_string(),
        |v| format!("Content-Type {:?}", String::from_utf8_lossy(v.as_bytes())),
    );
    Err(ApiError::new(
        415,
        "unsupported_media_type",
        format!(
            "{method} with {got}: request bodies must be JSON; send Content-Type: application/json"
        ),
    )
    .into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:7070",
            "localhost",
            "LOCALHOST:1",
            "[::1]",
            "[::1]:65535",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:7070",
            "127.0.0.1.evil.example",
            "127.0.0.1:",
            "127.0.0.1:70x",
            "localhost:123456",
            "[::1]x",
            "[::2]:1",
            "10.0.0.1:7070",
            "127.0.0.2",
            "::1",
            "localhost.",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn token_compare() {
        let t = Token(Arc::new(Zeroizing::new("a".repeat(64))));
        assert!(t.matches("a".repeat(64).as_bytes()));
        assert!(!t.matches("a".repeat(63).as_bytes()));
        assert!(!t.matches(b""));
        assert!(!t.matches(format!("{}b", "a".repeat(63)).as_bytes()));
    }

    #[test]
    fn token_file_made_0600_then_loaded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api-token");
        let a = load_or_create(&p).unwrap();
        assert_eq!(a.as_str().len(), 64);
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600);
        let b = load_or_create(&p).unwrap();
        assert_eq!(a.as_str(), b.as_str(), "a second start made a new token");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            load_or_create(&p),
            Err(TokenError::Exposed { mode: 0o640, .. })
        ));
        // Clients do not insist on the mode.
        assert_eq!(load(&p, false).unwrap().as_str(), a.as_str());
        std::fs::write(&p, "short\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(&p),
            Err(TokenError::Malformed { .. })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(matches!(
            load_or_create(&link),
            Err(TokenError::NotAFile { .. })
        ));
        assert!(matches!(
            load(&dir.path().join("none"), false),
            Err(TokenError::Missing { .. })
        ));
    }

    #[test]
    fn a_fifo_token_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api-token");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &p,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let t = std::time::Instant::now();
        for e in [load_or_create(&p), load(&p, false)] {
            let text = e.err().unwrap().to_string();
            assert!(
                text.contains("API token file") && text.contains("FIFO"),
                "{text}"
            );
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }
}
