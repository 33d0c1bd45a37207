//! `pdguard serve`: the daemon — registry, dangling flag, background sealing, reclaim, and
//! the admin API on a unix socket (mode 0600) or a loopback TCP port.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use pdguard_core::keys::MasterKey;
use pdguard_core::Profile;
use pdguard_engine::gate::SealedIo;
use pdguard_engine::jobs::SealOptions;
use pdguard_engine::keyfile::{self, KeyFileError};
use pdguard_engine::service::{Config, Service};

use super::image::ProfileArg;
use super::{CliError, DEFAULT_STATE_DIR, STATE_DIR_ENV};
use crate::api::auth::{self, Guard};
use crate::api::{server, Endpoint};
use crate::nbd::server::{ConnConfig, Listener, NbdAddr, TcpPolicy};
use crate::nbd::tls::{Tls, TlsMode};
use crate::plugin::{self, dockerd::Dockerd};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SealedIoArg {
    /// Readers see only sealed bytes; writes are refused (the patent unblocks I/O, claim 5).
    ReadOnly,
    /// Every request is refused.
    Refuse,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReclaimArg {
    /// Serve a sealed disk at once while it is unsealed behind its user's back (a record
    /// of version 4; an older one is copied).
    Instant,
    /// Unseal the whole disk first, then serve it.
    Copy,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// State directory: registry, socket, managed disks (default $PDGUARD_STATE_DIR, then
    /// /var/lib/pdguard).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Where the admin API listens: unix:PATH or tcp:127.0.0.1:PORT (default
    /// unix:STATE/pdguard.sock).
    #[arg(long)]
    pub api: Option<String>,
    /// How long every container of a disk must stay down before the disk is dangling and
    /// sealed, e.g. 30s, 2m, 1h 30m or 500ms.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = check_duration)]
    pub grace: String,
    /// Profile of new seals (README: "What each profile hides").
    #[arg(long, value_enum, default_value = "secure")]
    pub profile: ProfileArg,
    /// Master key file (default $PDGUARD_KEY_FILE, then /etc/pdguard/master.key if it
    /// exists, else STATE/master.key, made on first start).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// What I/O on a sealed disk gets.
    #[arg(long, value_enum, default_value = "read-only")]
    pub sealed_io: SealedIoArg,
    /// Seal and unseal jobs at once (default: one per core).
    #[arg(long, value_name = "N", value_parser = super::values::jobs)]
    pub jobs: Option<usize>,
    /// How bytes are moved by new seals; never changes the sealed image.
    #[arg(long, default_value = pdguard_engine::jobs::strategy::DEFAULT_STRATEGY, value_parser = super::image::strategy_values())]
    pub strategy: Option<String>,
    /// The bearer token of the TCP API (default STATE/api-token; made with mode 0600 on
    /// first start; refused if group or others can read it or another user owns it).
    #[arg(long)]
    pub api_token_file: Option<PathBuf>,
    /// A container stopped on purpose (`docker stop`, `container down` without --crashed
    /// or --removed) counts as non-operational: its disks are sealed after the grace.
    #[arg(long)]
    pub seal_stopped: bool,
    /// Serve the Docker volume plugin and follow dockerd's containers.
    #[arg(long)]
    pub docker: bool,
    /// The plugin's driver name: it listens on /run/docker/plugins/NAME.sock.
    #[arg(long, default_value = "pdguard")]
    pub docker_driver: String,
    /// dockerd's API socket.
    #[arg(long, default_value = "unix:///var/run/docker.sock")]
    pub docker_host: String,
    /// How often to reconcile with dockerd's containers and the kernel's mounts.
    #[arg(long, default_value = "30s")]
    pub docker_resync: String,
    /// How long a Docker Mount waits for its volume's unseal before it fails with how far
    /// the unseal is (which goes on; retry `docker run`); under dockerd's own 120 s limit.
    #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = mount_timeout)]
    pub docker_mount_timeout: Duration,
    /// Export every disk over NBD on unix:PATH (mode 0600) or tcp:HOST:PORT (repeatable;
    /// TCP needs TLS: --nbd-tls-certs or --nbd-tls-psk).
    #[arg(long, value_name = "unix:PATH|tcp:HOST:PORT")]
    pub nbd: Vec<String>,
    /// How an NBD client's `NBD_OPT_GO` reclaims a sealed disk: `instant` answers within a
    /// second and serves the disk while it is unsealed in the background
    /// (docs/instant-reclaim.md); `copy` unseals the whole disk before answering.
    #[arg(long, value_enum, default_value = "instant")]
    pub reclaim: ReclaimArg,
    /// How long an NBD request waits while its disk is being sealed or unsealed before EIO.
    #[arg(long, default_value = "60s")]
    pub nbd_hold: String,
    /// NBD TLS with X.509: DIR holds ca-cert.pem, server-cert.pem, server-key.pem (qemu's
    /// tls-creds-x509 layout); clients must present a certificate the CA signed.
    #[arg(long, value_name = "DIR", conflicts_with = "nbd_tls_psk")]
    pub nbd_tls_certs: Option<PathBuf>,
    /// NBD TLS with pre-shared keys: FILE of username:hexkey lines (psktool's format, as
    /// qemu's tls-creds-psk and nbdkit read it).
    #[arg(long, value_name = "FILE")]
    pub nbd_tls_psk: Option<PathBuf>,
    /// Whether NBD clients must use TLS (require: nothing is listed or served before
    /// NBD_OPT_STARTTLS) or may skip it (on). Default require when credentials are given.
    #[arg(long, value_enum)]
    pub nbd_tls: Option<NbdTlsArg>,
    /// Serve NBD on TCP without TLS required: every user who can reach the port can read
    /// and write every disk.
    #[arg(long)]
    pub nbd_insecure_tcp: bool,
    /// Allow --nbd tcp: on a non-loopback address without TLS (with --nbd-insecure-tcp).
    #[arg(long)]
    pub nbd_allow_remote: bool,
    /// Unix NBD sockets get mode 0660 and this group (name or gid), e.g. libvirt-qemu's
    /// group, so that an unprivileged qemu can connect; everyone else still gets EACCES.
    #[arg(long, value_name = "GROUP")]
    pub nbd_socket_group: Option<String>,
    /// NBD connections served at once over all listeners; more are closed at once.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub nbd_max_connections: u32,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum NbdTlsArg {
    /// Every client must negotiate TLS first.
    Require,
    /// TLS is offered; clients may go on in clear text.
    On,
}

/// `--grace`: checked when parsed, so that a bad value is a usage error naming the fix;
/// kept as text (`run` reads it).
fn check_duration(text: &str) -> Result<String, String> {
    match humantime::parse_duration(text) {
        Ok(_) => Ok(text.to_string()),
        Err(_) => Err(format!(
            "{text:?} is not a duration; give a number and a unit, such as 30s, 2m, 1h 30m or 500ms"
        )),
    }
}

/// `--docker-mount-timeout`: a duration under dockerd's own 120 s, checked when parsed.
fn mount_timeout(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|_| {
        format!("{text:?} is not a duration; give a number and a unit, such as 90s or 30s")
    })?;
    pdguard_engine::service::check_docker_mount_timeout(d)?;
    Ok(d)
}

/// What `--docker` asks for, checked.
struct DockerArgs {
    driver: String,
    dockerd: Dockerd,
    resync: Duration,
}

fn docker_args(a: &ServeArgs) -> Result<Option<DockerArgs>, CliError> {
    if !a.docker {
        return Ok(None);
    }
    if !plugin::valid_driver(&a.docker_driver) {
        return Err(CliError::Usage(format!(
            "--docker-driver {:?} is not 1-64 letters, digits, '.', '_' or '-'",
            a.docker_driver
        )));
    }
    let resync = bounded_duration("--docker-resync", &a.docker_resync, false)?;
    Ok(Some(DockerArgs {
        driver: a.docker_driver.clone(),
        dockerd: Dockerd::parse(&a.docker_host).map_err(CliError::Usage)?,
        resync,
    }))
}

pub fn state_dir(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os(STATE_DIR_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

/// The master key of new seals and where it was read, when it is not the state
/// directory's own: read before the state directory is made, so that a bad key file
/// refuses the start with nothing changed. `Ok(None)`: the state directory's key (made on
/// first start) is the one, see [`own_master_key`].
type KeyAt = Option<(MasterKey, PathBuf)>;

fn given_master_key(a: &ServeArgs) -> Result<Option<KeyAt>, CliError> {
    if matches!(a.profile, ProfileArg::Patent) && a.key_file.is_none() {
        return Ok(Some(None));
    }
    let explicit = a.key_file.is_some() || std::env::var_os(keyfile::KEY_FILE_ENV).is_some();
    let system = PathBuf::from(keyfile::DEFAULT_KEY_FILE);
    if explicit || system.exists() {
        let path = keyfile::locate(a.key_file.as_deref());
        return Ok(Some(Some((keyfile::load(&path)?, path))));
    }
    Ok(None)
}

/// STATE/master.key, made on first start.
fn own_master_key(state: &Path) -> Result<KeyAt, CliError> {
    let own = state.join("master.key");
    match keyfile::load(&own) {
        Ok(k) => Ok(Some((k, own))),
        Err(KeyFileError::Missing { .. }) => {
            let k = keyfile::generate(&own)?;
            tracing::warn!(path = %own.display(), id = %k.id(), "made a new master key; back it up");
            Ok(Some((k, own)))
        }
        Err(e) => Err(e.into()),
    }
}

/// Make the state directory (mode 0700) if missing and resolve it once, symlinks and `..`
/// included: every path the daemon compares with the kernel's (mountpoints, disk files)
/// derives from this canonical form. A directory another user owns, or that its group or
/// others may write, is refused (exit 2) rather than quietly re-moded.
fn prepare_state_dir(given: &Path) -> Result<PathBuf, CliError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(given)
        .map_err(|source| CliError::Io {
            what: format!("cannot create the state directory {}", given.display()),
            source,
        })?;
    let state = std::fs::canonicalize(given).map_err(|source| CliError::Io {
        what: format!("cannot resolve the state directory {}", given.display()),
        source,
    })?;
    pdguard_engine::service::check_state_dir(&state).map_err(CliError::Usage)?;
    // Closed to group and others for reading too (names of disks, the registry).
    let _ = std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700));
    Ok(state)
}

/// A duration flag that bounds a wait or a period: at most a day, so no deadline computed
/// from it can overflow.
fn bounded_duration(flag: &str, text: &str, zero_ok: bool) -> Result<Duration, CliError> {
    const MAX: Duration = Duration::from_secs(86_400);
    match humantime::parse_duration(text) {
        Ok(d) if d <= MAX && (zero_ok || !d.is_zero()) => Ok(d),
        _ => Err(CliError::Usage(format!(
            "{flag} {text:?} is not a duration from {} to 24h, such as 30s or 500ms",
            if zero_ok { "0s" } else { "1ms" }
        ))),
    }
}

/// How long a SIGTERM waits for running jobs before it leaves them to their records.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

pub fn run(a: &ServeArgs) -> Result<(), CliError> {
    // Settings are checked before the state directory is touched: a bad one is a usage
    // error now, not a failed seal later.
    if let Some(name) = &a.strategy {
        if pdguard_engine::jobs::strategy::by_name(name).is_none() {
            return Err(CliError::Usage(format!(
                "--strategy {name:?} is not a strategy; use one of: {}",
                pdguard_engine::jobs::strategy::STRATEGIES.join(", ")
            )));
        }
    }
    if a.jobs == Some(0) {
        return Err(CliError::Usage(
            "--jobs 0: at least one job must be able to run; pass --jobs 1 or more".into(),
        ));
    }
    let grace = humantime::parse_duration(&a.grace).map_err(|e| {
        CliError::Usage(format!(
            "--grace {:?} is not a duration such as 30s, 2m or 500ms: {e}",
            a.grace
        ))
    })?;
    // The NBD listeners' settings and TLS credentials, the plugin's and the API's, before
    // anything is made: a refused start leaves no state directory and no key behind.
    let nbd = nbd_options(a)?;
    let docker = docker_args(a)?;
    let api = a
        .api
        .as_deref()
        .map(|s| Endpoint::parse(s).map_err(CliError::Usage))
        .transpose()?;
    if let Some(Endpoint::Tcp(addr)) = &api {
        let loopback = addr
            .parse::<std::net::SocketAddr>()
            .map(|a| a.ip().is_loopback());
        if loopback != Ok(true) {
            return Err(CliError::Usage(format!(
                "--api tcp:{addr}: the admin API listens only on loopback; use an address such as tcp:127.0.0.1:7070"
            )));
        }
    }
    if let Some(Endpoint::Unix(path)) = &api {
        parent_exists("--api", path)?;
    }
    let given_key = given_master_key(a)?;
    let state = prepare_state_dir(&state_dir(a.state_dir.as_deref()))?;
    let endpoint = api.unwrap_or_else(|| Endpoint::Unix(state.join("pdguard.sock")));
    let guard = match &endpoint {
        Endpoint::Tcp(_) => {
            let file = a
                .api_token_file
                .clone()
                .unwrap_or_else(|| state.join(auth::TOKEN_FILE_NAME));
            let file = std::path::absolute(&file).unwrap_or(file);
            Guard {
                tcp_token: Some(auth::load_or_create(&file)?),
                token_file: Some(file),
            }
        }
        Endpoint::Unix(_) => Guard {
            tcp_token: None,
            token_file: None,
        },
    };
    let key = match given_key {
        Some(k) => k,
        None => own_master_key(&state)?,
    };
    let cfg = Config {
        grace,
        profile: match a.profile {
            ProfileArg::Secure => Profile::Secure,
            ProfileArg::Patent => Profile::Patent,
        },
        master_key: key.as_ref().map(|(k, _)| k.clone()),
        sealed_io: match a.sealed_io {
            SealedIoArg::ReadOnly => SealedIo::ReadOnly,
            SealedIoArg::Refuse => SealedIo::Refuse,
        },
        jobs: a.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        sector_size: 512,
        strategy: a
            .strategy
            .clone()
            .unwrap_or_else(|| SealOptions::default().strategy),
        seal_stopped: a.seal_stopped,
        state_dir: state,
        observer: super::testhook::PauseAt::from_env()
            .map(|p| pdguard_engine::service::Observer(std::sync::Arc::new(p))),
        docker_mount_timeout: a.docker_mount_timeout,
        reclaim: match a.reclaim {
            ReclaimArg::Instant => pdguard_engine::service::ReclaimMode::Instant,
            ReclaimArg::Copy => pdguard_engine::service::ReclaimMode::Copy,
        },
    };
    cfg.check().map_err(CliError::Usage)?;
    let key_text = match &key {
        Some((k, path)) => format!("master key {} (id {})", path.display(), k.id()),
        None => "no master key (patent profile)".to_string(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| CliError::Io {
            what: "cannot start the async runtime".into(),
            source,
        })?;
    let r = rt.block_on(serve(cfg, endpoint, guard, key_text, docker, nbd));
    // A job still running is not interrupted: it had SHUTDOWN_WAIT to finish, and now the
    // process exits under it, mid-pass. Its seal record holds its place (every write is
    // committed in crash-safe order), so it resumes on the next start exactly as after a
    // crash.
    rt.shutdown_timeout(Duration::from_millis(200));
    r
}

/// The NBD listeners and their settings, checked before anything starts.
struct NbdOptions {
    addrs: Vec<NbdAddr>,
    conn: ConnConfig,
}

fn nbd_options(a: &ServeArgs) -> Result<NbdOptions, CliError> {
    let hold = bounded_duration("--nbd-hold", &a.nbd_hold, true)?;
    let tls = nbd_tls(a)?;
    let policy = TcpPolicy {
        tls_required: tls.as_ref().is_some_and(|t| t.required()),
        insecure: a.nbd_insecure_tcp,
        allow_remote: a.nbd_allow_remote,
    };
    let addrs = a
        .nbd
        .iter()
        .map(|s| NbdAddr::parse(s, policy))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    for addr in &addrs {
        if let NbdAddr::Unix(path) = addr {
            parent_exists("--nbd", path)?;
        }
    }
    let socket_group = a
        .nbd_socket_group
        .as_deref()
        .map(crate::nbd::server::resolve_group)
        .transpose()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let mut conn = ConnConfig::new(hold);
    conn.tls = tls.map(std::sync::Arc::new);
    conn.max_connections = a.nbd_max_connections as usize;
    conn.socket_group = socket_group;
    Ok(NbdOptions { addrs, conn })
}

/// A unix socket can be bound only in a directory that exists: checked before anything is
/// made, so that such a start is refused with nothing changed.
fn parent_exists(flag: &str, path: &Path) -> Result<(), CliError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if dir.is_dir() {
        return Ok(());
    }
    Err(CliError::Usage(format!(
        "{flag} unix:{}: the directory {} does not exist; create it first or give a socket path in an existing directory",
        path.display(),
        dir.display()
    )))
}

/// The TLS credentials of the NBD listeners, loaded and checked before anything starts.
fn nbd_tls(a: &ServeArgs) -> Result<Option<Tls>, CliError> {
    let mode = match a.nbd_tls {
        Some(NbdTlsArg::On) => TlsMode::On,
        Some(NbdTlsArg::Require) | None => TlsMode::Require,
    };
    let loaded = match (&a.nbd_tls_certs, &a.nbd_tls_psk) {
        (Some(dir), _) => Tls::x509(dir, mode),
        (None, Some(file)) => Tls::psk(file, mode),
        (None, None) if a.nbd_tls.is_some() => {
            return Err(CliError::Usage(
                "--nbd-tls needs credentials: --nbd-tls-certs DIR or --nbd-tls-psk FILE".into(),
            ))
        }
        (None, None) => return Ok(None),
    };
    loaded
        .map(Some)
        .map_err(|e| CliError::Usage(format!("NBD TLS: {}", pdguard_engine::error_chain(&e))))
}

/// The volume plugin on /run/docker/plugins/NAME.sock, and the follower of dockerd.
/// Returns the socket's path, removed at shutdown: dockerd tries every socket it finds there.
fn start_docker(
    svc: &Service,
    d: DockerArgs,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<PathBuf, CliError> {
    let dir = Path::new(plugin::PLUGIN_DIR);
    std::fs::create_dir_all(dir).map_err(|source| CliError::Io {
        what: format!("cannot create {}", dir.display()),
        source,
    })?;
    let sock = dir.join(format!("{}.sock", d.driver));
    let listener = bind_unix(&sock)?;
    let path = sock.clone();
    let app = plugin::router(svc.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the volume plugin's server failed");
        }
    });
    eprintln!(
        "pdguard: serving the Docker volume plugin {:?} on {}",
        d.driver,
        sock.display()
    );
    let svc = svc.clone();
    tokio::spawn(async move {
        svc.follow_docker(std::sync::Arc::new(d.dockerd), d.driver, d.resync, stop)
            .await
    });
    Ok(path)
}

async fn serve(
    cfg: Config,
    endpoint: Endpoint,
    guard: Guard,
    key_text: String,
    docker: Option<DockerArgs>,
    nbd: NbdOptions,
) -> Result<(), CliError> {
    let svc = Service::start(cfg).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let plugin_sock = match docker {
        Some(d) => Some(start_docker(&svc, d, stop_rx.clone())?),
        None => None,
    };
    let conn_cfg = std::sync::Arc::new(nbd.conn);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(conn_cfg.max_connections));
    let mut nbd_tasks = Vec::new();
    for addr in &nbd.addrs {
        let listener = Listener::bind(addr, conn_cfg.socket_group)
            .await
            .map_err(|e| CliError::Input(pdguard_engine::error_chain(&e)))?;
        let tls = match &conn_cfg.tls {
            Some(t) if t.required() => format!(" (TLS {} required)", t.kind),
            Some(t) => format!(" (TLS {} offered, clear text allowed)", t.kind),
            None => String::new(),
        };
        eprintln!("pdguard: serving NBD on {}{tls}", listener.local());
        nbd_tasks.push(tokio::spawn(crate::nbd::server::run(
            listener,
            svc.clone(),
            std::sync::Arc::clone(&conn_cfg),
            std::sync::Arc::clone(&slots),
            stop_rx.clone(),
        )));
    }
    let policy = {
        let svc = svc.clone();
        tokio::spawn(async move { svc.run_policy(stop_rx).await })
    };
    let app = server::router(svc.clone(), guard);
    // Raised when the signal comes: a request still open (a client waiting for a job)
    // holds the server only SHUTDOWN_WAIT longer.
    let (sig_tx, sig_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
        }
        eprintln!(
            "pdguard: stopping: no new requests; running jobs get {} s to finish",
            SHUTDOWN_WAIT.as_secs()
        );
        let _ = sig_tx.send(true);
    };
    let state = svc.config().state_dir.display().to_string();
    let served = match &endpoint {
        Endpoint::Unix(path) => {
            let listener = bind_unix(path)?;
            eprintln!("pdguard: serving the admin API on {endpoint} (state {state})");
            hello(&state, &key_text, None);
            bounded(
                axum::serve(listener, app).with_graceful_shutdown(shutdown),
                sig_rx,
            )
            .await
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| CliError::Io {
                    what: format!("cannot listen on {addr}"),
                    source,
                })?;
            // With port 0 the kernel picks the port: print the real one.
            let bound = listener
                .local_addr()
                .map_or(addr.clone(), |a| a.to_string());
            eprintln!("pdguard: serving the admin API on tcp:{bound} (state {state})");
            hello(&state, &key_text, Some(&bound));
            bounded(
                axum::serve(listener, app).with_graceful_shutdown(shutdown),
                sig_rx,
            )
            .await
        }
    };
    let _ = stop_tx.send(true);
    // NBD connections answer what is in flight and end (each listener waits a bounded time).
    for t in nbd_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(6), t).await;
    }
    if let Some(sock) = plugin_sock {
        let _ = std::fs::remove_file(sock);
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), policy).await;
    if tokio::time::timeout(SHUTDOWN_WAIT, svc.wait_idle())
        .await
        .is_err()
    {
        for (disk, p) in svc.running_jobs() {
            eprintln!("pdguard: {p} of {disk} did not finish and stops with the process, mid-pass; its seal record holds its place and it resumes on the next start");
        }
    }
    if let Endpoint::Unix(path) = &endpoint {
        let _ = std::fs::remove_file(path);
    }
    eprintln!("pdguard: stopped");
    served.map_err(|source| CliError::Io {
        what: "the admin API server failed".into(),
        source,
    })
}

/// The server future, given at most SHUTDOWN_WAIT after the signal to close open requests.
async fn bounded<F>(server: F, mut sig: tokio::sync::watch::Receiver<bool>) -> std::io::Result<()>
where
    F: std::future::IntoFuture<Output = std::io::Result<()>>,
{
    let server = server.into_future();
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r,
        _ = async {
            let _ = sig.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_WAIT).await;
        } => {
            eprintln!("pdguard: requests still open after {} s were closed; their jobs resume from their records", SHUTDOWN_WAIT.as_secs());
            Ok(())
        }
    }
}

/// Where the daemon is and what to try next, for a first-time operator.
fn hello(state: &str, key_text: &str, tcp: Option<&str>) {
    eprintln!("pdguard: {key_text}; PDGUARD_LOG=info logs every pass");
    let next = match tcp {
        None => format!("export PDGUARD_STATE_DIR={state}; pdguard disk create d1 --size 64M"),
        Some(addr) => {
            format!("pdguard disk create d1 --size 64M --api tcp:{addr} --state-dir {state}")
        }
    };
    eprintln!("pdguard: next, in another shell: {next}");
}

/// Bind the socket with mode 0600, replacing a stale socket file but never another file.
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, CliError> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(CliError::Input(format!(
                "{} exists and is not a socket; move it away or pass another --api",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(CliError::Input(format!(
                "another pdguard daemon already serves {}; stop it first",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    let io = |what: String| move |source| CliError::Io { what, source };
    let l = tokio::net::UnixListener::bind(path)
        .map_err(io(format!("cannot listen on {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("cannot set the mode of {}", path.display())))?;
    Ok(l)
}
