//! The admin API: HTTP/1.1 + JSON on a unix socket (default `STATE/pdguard.sock`, mode
//! 0600) or a loopback TCP port with a bearer token (see [`auth`]). `docs/api.md` documents
//! every endpoint.

pub mod auth;
pub mod client;
pub mod server;

use std::path::PathBuf;

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    /// Parse `unix:PATH` or `tcp:HOST:PORT`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!(
                    "--api {s:?} names no socket path; use unix:/path/to/pdguard.sock"
                ));
            }
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            if a.parse::<std::net::SocketAddr>().is_err() {
                return Err(format!("--api {s:?} is not tcp:HOST:PORT with a numeric address, e.g. tcp:127.0.0.1:7070"));
            }
            return Ok(Self::Tcp(a.to_string()));
        }
        Err(format!("--api {s:?} must be unix:PATH or tcp:HOST:PORT"))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            Endpoint::parse("unix:/run/p.sock"),
            Ok(Endpoint::Unix(PathBuf::from("/run/p.sock")))
        );
        assert_eq!(
            Endpoint::parse("tcp:127.0.0.1:7070"),
            Ok(Endpoint::Tcp("127.0.0.1:7070".into()))
        );
        assert!(Endpoint::parse("tcp:localhost").is_err());
        assert!(Endpoint::parse("unix:").is_err());
        assert!(Endpoint::parse("http://x").is_err());
    }
}
