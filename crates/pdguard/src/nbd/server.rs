//! The NBD listeners of `pdguard serve --nbd unix:PATH|tcp:HOST:PORT`: bind (a unix socket
//! of mode 0600, or 0660 for `--nbd-socket-group`; TCP only with TLS required, or with
//! `--nbd-insecure-tcp`), accept under a connection limit (`--nbd-max-connections`: a
//! semaphore, as mini-redis's `server.rs` has), and run each connection — handshake, then
//! transmission — until it ends or the shutdown signal comes.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pdguard_engine::service::{Service, NBD_CONTAINER_PREFIX};
use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};

use super::connection::{Inbox, Sock};
use super::handshake::{self, Negotiation};
use super::tls::Tls;
use super::transmit;

/// How long the listeners wait for their connections to finish after the shutdown signal.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("--nbd {0:?} is not unix:PATH or tcp:HOST:PORT (e.g. unix:/run/pdguard/nbd.sock or tcp:127.0.0.1:10809)")]
    Address(String),
    #[error("--nbd tcp:{0} is not a loopback address and its traffic would be clear text: require TLS (--nbd-tls-certs DIR or --nbd-tls-psk FILE), or pass --nbd-allow-remote if the network is trusted")]
    Remote(String),
    #[error("--nbd tcp:{0} without TLS lets every local user read and write every disk (loopback is no trust boundary): give --nbd-tls-certs DIR or --nbd-tls-psk FILE, or --nbd-insecure-tcp to accept that")]
    Insecure(String),
    #[error("--nbd-socket-group {0:?} is not a group of this host (/etc/group) nor a number")]
    Group(String),
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

/// Settings shared by every connection.
#[derive(Debug)]
pub struct ConnConfig {
    /// How long a request waits at a blocked gate before `EIO` (`--nbd-hold`).
    pub hold: Duration,
    /// How long a client may take, in all, to send its handshake (TLS's included): a
    /// client that trickles bytes cannot hold a connection slot longer.
    pub handshake_timeout: Duration,
    /// TLS, if configured (`--nbd-tls-certs`, `--nbd-tls-psk`).
    pub tls: Option<Arc<Tls>>,
    /// Connections served at once, over every listener (`--nbd-max-connections`).
    pub max_connections: usize,
    /// The group of unix sockets (`--nbd-socket-group`): mode 0660 instead of 0600.
    pub socket_group: Option<u32>,
}

impl ConnConfig {
    pub fn new(hold: Duration) -> Self {
        Self {
            hold,
            handshake_timeout: Duration::from_secs(60),
            tls: None,
            max_connections: 64,
            socket_group: None,
        }
    }
}

/// Where an NBD listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

/// What a TCP listener may be, from the TLS flags.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpPolicy {
    /// TLS is required on every connection.
    pub tls_required: bool,
    /// `--nbd-insecure-tcp`: clear text on TCP is accepted.
    pub insecure: bool,
    /// `--nbd-allow-remote`: clear text on a non-loopback address is accepted too.
    pub allow_remote: bool,
}

impl NbdAddr {
    pub fn parse(s: &str, policy: TcpPolicy) -> Result<Self, ServerError> {
        if let Some(p) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        let Some(a) = s.strip_prefix("tcp:") else {
            return Err(ServerError::Address(s.into()));
        };
        let addr: std::net::SocketAddr = a.parse().map_err(|_| ServerError::Address(s.into()))?;
        if policy.tls_required {
            return Ok(Self::Tcp(addr));
        }
        if !addr.ip().is_loopback() && !policy.allow_remote {
            return Err(ServerError::Remote(a.into()));
        }
        if !policy.insecure {
            return Err(ServerError::Insecure(a.into()));
        }
        tracing::warn!(address = %addr, "NBD on TCP without TLS (--nbd-insecure-tcp): every user who can reach it can read and write every disk");
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

/// The gid of `--nbd-socket-group`: a name from /etc/group, or a number.
pub fn resolve_group(name: &str) -> Result<u32, ServerError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let n = f.next()?;
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            (n == name).then_some(gid)
        })
        .next()
        .ok_or_else(|| ServerError::Group(name.into()))
}

pub enum Listener {
    /// The listener, its path, and the inode of the socket file bound there (removed at
    /// shutdown only if the path still names that socket).
    Unix(UnixListener, PathBuf, u64),
    Tcp(TcpListener),
}

impl Listener {
    pub async fn bind(addr: &NbdAddr, group: Option<u32>) -> Result<Self, ServerError> {
        match addr {
            NbdAddr::Unix(p) => {
                let l = bind_unix(p, group)?;
                let ino = std::fs::symlink_metadata(p).map_or(0, |m| m.ino());
                Ok(Self::Unix(l, p.clone(), ino))
            }
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
            Self::Unix(_, p, _) => format!("unix:{}", p.display()),
            Self::Tcp(l) => l
                .local_addr()
                .map(|a| format!("tcp:{a}"))
                .unwrap_or_else(|_| "tcp:?".into()),
        }
    }
}

/// Bind with mode 0600 (or 0660 and `group`), replacing a stale socket file but never
/// another file. The socket is bound in a fresh directory of mode 0700, given its mode and
/// group there, then renamed into place: at no instant can anyone else connect to it.
fn bind_unix(path: &Path, group: Option<u32>) -> Result<UnixListener, ServerError> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(ServerError::NotSocket(path.into()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.into()));
        }
    }
    let bind = |source| ServerError::Bind {
        what: path.display().to_string(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = parent.join(format!(".pdguard-nbd.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(bind)?;
    let staged = tmp.join("s");
    let placed = (|| {
        let l = UnixListener::bind(&staged)?;
        let mode = if group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        if let Some(g) = group {
            rustix::fs::chown(&staged, None, Some(rustix::fs::Gid::from_raw(g)))?;
        }
        std::fs::rename(&staged, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    placed.map_err(bind)
}

/// Accept connections until `stop` turns true, then give those still open `DRAIN` to end.
pub async fn run(
    listener: Listener,
    svc: Service,
    cfg: Arc<ConnConfig>,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    static SEQ: AtomicU64 = AtomicU64::new(1);
    loop {
        let accepted: std::io::Result<(Sock, String)> = tokio::select! {
            r = accept(&listener) => r,
            _ = stop.wait_for(|s| *s) => {
                remove_socket(&listener);
                break;
            }
        };
        let (sock, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept an NBD connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(peer = %peer, max = cfg.max_connections, "NBD connection refused: the limit of connections is reached (--nbd-max-connections)");
            drop(sock);
            continue;
        };
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("{NBD_CONTAINER_PREFIX}{peer}#{seq}");
        tracing::info!(conn = %id, "NBD connection");
        let (svc, cfg, stop) = (svc.clone(), Arc::clone(&cfg), stop.clone());
        tokio::spawn(async move {
            handle(sock, id, svc, cfg, stop).await;
            drop(permit);
        });
    }
    let all = u32::try_from(cfg.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("NBD connections still open at shutdown were dropped");
    }
}

/// A unix listener's socket file is removed at shutdown, as the admin socket is, if the path
/// still names the socket this daemon bound (never a file someone put there since).
fn remove_socket(listener: &Listener) {
    if let Listener::Unix(_, path, ino) = listener {
        let ours = std::fs::symlink_metadata(path)
            .is_ok_and(|m| m.file_type().is_socket() && m.ino() == *ino);
        if ours {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn accept(l: &Listener) -> std::io::Result<(Sock, String)> {
    match l {
        Listener::Unix(l, _, _) => {
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

/// Serve one connection to its end. `id` is the container name of its association.
pub async fn handle(
    sock: Sock,
    id: String,
    svc: Service,
    cfg: Arc<ConnConfig>,
    mut stop: watch::Receiver<bool>,
) {
    let mut inbox = Inbox::default();
    let mut neg = Negotiation::new(&svc, &cfg, &id);
    // A shutdown during the handshake drops it, and the socket with it.
    let shaken = tokio::select! {
        r = handshake::run(sock, &mut inbox, &mut neg) => Some(r),
        _ = stop.wait_for(|s| *s) => None,
    };
    let attached = neg.attached;
    let result = match shaken {
        Some(Ok((sock, Some(agreed)))) => {
            tracing::info!(conn = %id, disk = %agreed.export.name, "NBD transmission");
            match sock.into_std() {
                Ok(std) => transmit::run(inbox, std, *agreed, &id, stop).await,
                Err(e) => Err(e.into()),
            }
        }
        Some(Ok((mut sock, None))) => {
            sock.shutdown().await;
            Ok(())
        }
        Some(Err(e)) => Err(e),
        None => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!(conn = %id, error = %pdguard_engine::error_chain(&e), "NBD connection closed");
    }
    if attached {
        svc.nbd_detach(&id).await;
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
