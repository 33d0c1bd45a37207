//! The NBD listeners of `pdguard serve --nbd unix:PATH|tcp:HOST:PORT`: bind (a unix socket
//! of mode 0600; TCP on loopback unless `--nbd-allow-remote`), accept, and run one
//! connection task each.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pdguard_engine::service::{Service, NBD_CONTAINER_PREFIX};
use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use super::conn::{self, ConnConfig, Sock};

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("--nbd {0:?} is not unix:PATH or tcp:HOST:PORT (e.g. unix:/run/pdguard/nbd.sock or tcp:127.0.0.1:10809)")]
    Address(String),
    #[error("--nbd tcp:{0} is not a loopback address; NBD traffic is clear text (no TLS yet): listen on 127.0.0.1, or pass --nbd-allow-remote if the network is trusted")]
    Remote(String),
    #[error("{0} exists and is not a socket; move it away or pass another --nbd path")]
    NotSocket(PathBuf),
    #[error("another process already serves NBD on {0}; stop it first")]
    InUse(PathBuf),
    #[error("cannot listen for NBD on {what}")]
    Bind {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where an NBD listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl NbdAddr {
    pub fn parse(s: &str, allow_remote: bool) -> Result<Self, ServerError> {
        if let Some(p) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        let Some(a) = s.strip_prefix("tcp:") else {
            return Err(ServerError::Address(s.into()));
        };
        let addr: std::net::SocketAddr = a.parse().map_err(|_| ServerError::Address(s.into()))?;
        if !addr.ip().is_loopback() {
            if !allow_remote {
                return Err(ServerError::Remote(a.into()));
            }
            tracing::warn!(address = %addr, "NBD listens on a non-loopback address: its traffic is clear text (no TLS)");
        }
        Ok(Self::Tcp(addr))
    }
}

impl std::fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    pub async fn bind(addr: &NbdAddr) -> Result<Self, ServerError> {
        match addr {
            NbdAddr::Unix(p) => Ok(Self::Unix(bind_unix(p)?, p.clone())),
            NbdAddr::Tcp(a) => {
                TcpListener::bind(a)
                    .await
                    .map(Self::Tcp)
                    .map_err(|source| ServerError::Bind {
                        what: a.to_string(),
                        source,
                    })
            }
        }
    }

    /// The address actually bound (a TCP port 0 becomes the real port).
    pub fn local(&self) -> String {
        match self {
            Self::Unix(_, p) => format!("unix:{}", p.display()),
            Self::Tcp(l) => l
                .local_addr()
                .map(|a| format!("tcp:{a}"))
                .unwrap_or_else(|_| "tcp:?".into()),
        }
    }
}

/// Bind with mode 0600 (owner only), replacing a stale socket file but never another file.
fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(ServerError::NotSocket(path.into()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.into()));
        }
        let _ = std::fs::remove_file(path);
    }
    let bind = |source| ServerError::Bind {
        what: path.display().to_string(),
        source,
    };
    let l = UnixListener::bind(path).map_err(bind)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind)?;
    Ok(l)
}

/// Accept connections until `stop` turns true.
pub async fn run(
    listener: Listener,
    svc: Service,
    cfg: Arc<ConnConfig>,
    mut stop: watch::Receiver<bool>,
) {
    static SEQ: AtomicU64 = AtomicU64::new(1);
    loop {
        let accepted: std::io::Result<(Sock, String)> = tokio::select! {
            r = accept(&listener) => r,
            _ = stop.changed() => return,
        };
        let (sock, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept an NBD connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("{NBD_CONTAINER_PREFIX}{peer}#{seq}");
        tracing::info!(conn = %id, "NBD connection");
        tokio::spawn(conn::serve(sock, id, svc.clone(), Arc::clone(&cfg)));
    }
}

async fn accept(l: &Listener) -> std::io::Result<(Sock, String)> {
    match l {
        Listener::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            let peer = match s.peer_cred().ok().and_then(|c| c.pid()) {
                Some(pid) => format!("unix:pid{pid}"),
                None => "unix".into(),
            };
            Ok((Sock::Unix(s), peer))
        }
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            s.set_nodelay(true)?;
            Ok((Sock::Tcp(s), a.to_string()))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            NbdAddr::parse("unix:/tmp/x.sock", false).unwrap(),
            NbdAddr::Unix("/tmp/x.sock".into())
        );
        assert!(matches!(
            NbdAddr::parse("tcp:127.0.0.1:0", false).unwrap(),
            NbdAddr::Tcp(_)
        ));
        assert!(matches!(
            NbdAddr::parse("tcp:0.0.0.0:10809", false),
            Err(ServerError::Remote(_))
        ));
        assert!(NbdAddr::parse("tcp:0.0.0.0:10809", true).is_ok());
        for bad in ["", "unix:", "tcp:localhost", "udp:1.2.3.4:5", "/tmp/x"] {
            assert!(NbdAddr::parse(bad, false).is_err(), "{bad}");
        }
    }
}
