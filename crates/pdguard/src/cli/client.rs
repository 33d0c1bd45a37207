//! Clients of the daemon: `pdguard disk …`, `pdguard container …`, `pdguard status`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::{serve, Cli, CliError};
use crate::api::auth::{self, Token};
use crate::api::client::call;
use crate::api::Endpoint;

/// How to reach the daemon.
#[derive(Debug, Args)]
pub struct Conn {
    /// The daemon's API: unix:PATH or tcp:HOST:PORT.
    #[arg(long, global = true)]
    pub api: Option<String>,
    /// The daemon's state directory; its socket is STATE/pdguard.sock (default
    /// $PDGUARD_STATE_DIR, then /var/lib/pdguard).
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// The TCP API's bearer token file (default $PDGUARD_API_TOKEN_FILE, then
    /// STATE/api-token); not needed on the unix socket.
    #[arg(long, global = true)]
    pub api_token_file: Option<PathBuf>,
}

impl Conn {
    fn endpoint(&self) -> Result<Endpoint, CliError> {
        match &self.api {
            Some(a) => Endpoint::parse(a).map_err(CliError::Usage),
            None => Ok(Endpoint::Unix(
                serve::state_dir(self.state_dir.as_deref()).join("pdguard.sock"),
            )),
        }
    }

    /// The bearer token to send: read on TCP only.
    fn token(&self, at: &Endpoint) -> Result<Option<Token>, CliError> {
        match at {
            Endpoint::Unix(_) => Ok(None),
            Endpoint::Tcp(_) => {
                let state = serve::state_dir(self.state_dir.as_deref());
                let file = auth::client_token_file(self.api_token_file.as_deref(), &state);
                Ok(Some(auth::load(&file, false)?))
            }
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Register a new disk (a sparse file in STATE/disks/, or at --path).
    Create {
        /// The disk's name: letters, digits, '.', '_' and '-'.
        name: String,
        /// Size, e.g. 64M, 1.5G, 1GiB or 1073741824 (K, M, G, T: powers of 1024), a whole
        /// number of 512-byte sectors.
        #[arg(long, value_name = "SIZE", value_parser = super::size::disk, allow_hyphen_values = true)]
        size: u64,
        /// Use this file instead of one in the state directory (a new file, or an existing
        /// one to adopt as it is); a relative path is made absolute here, since the daemon
        /// runs elsewhere. Its directory must exist.
        #[arg(long, value_parser = super::paths::new_file)]
        path: Option<PathBuf>,
    },
    /// List disks.
    Ls,
    /// Show one disk.
    Show {
        /// The disk's name.
        name: String,
    },
    /// Delete a disk (and its file, if it lives in the state directory). A sealed or
    /// failed disk needs --shred or --keep-file.
    Rm {
        /// The disk's name.
        name: String,
        /// Crypto-erase a sealed disk first (secure profile).
        #[arg(long)]
        shred: bool,
        /// Keep the disk's file and seal record as they are; only forget the disk.
        #[arg(long)]
        keep_file: bool,
    },
    /// Seal a disk now.
    Seal {
        /// The disk's name.
        name: String,
        /// Seal it even while running containers or NBD clients use it: their I/O is
        /// held during the seal, then refused (or read-only, per --sealed-io).
        #[arg(long)]
        force: bool,
    },
    /// Unseal a sealed disk now.
    Unseal {
        /// The disk's name.
        name: String,
    },
    /// Wait until a disk reaches a state: exit 0 when it does, 1 if it fails (unless
    /// waiting for `failed`), 124 when the timeout runs out.
    Wait {
        /// The disk's name.
        name: String,
        /// The state to wait for.
        #[arg(long, value_enum)]
        state: WaitState,
        /// Give up after this long, e.g. 60s, 2m or 500ms.
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
}

/// A disk state a script can wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WaitState {
    /// Never attached (or unsealed with no container).
    Available,
    /// Used by a running container.
    Attached,
    /// No operational container; the grace period is running.
    Grace,
    /// A seal job is running.
    Sealing,
    /// Sealed.
    Sealed,
    /// An unseal job is running.
    Unsealing,
    /// Served while its instant reclaim's migration runs.
    Migrating,
    /// The last job failed.
    Failed,
}

impl WaitState {
    fn name(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Attached => "attached",
            Self::Grace => "grace",
            Self::Sealing => "sealing",
            Self::Sealed => "sealed",
            Self::Unsealing => "unsealing",
            Self::Migrating => "migrating",
            Self::Failed => "failed",
        }
    }
}

/// `disk wait`: poll the disk until it is in `want`, fails, or `timeout` runs out.
fn wait(
    name: &str,
    want: WaitState,
    timeout: &str,
    conn: &Conn,
    cli: &Cli,
) -> Result<(), CliError> {
    let limit = humantime::parse_duration(timeout).map_err(|_| {
        CliError::Usage(format!(
            "--timeout {timeout:?} is not a duration such as 60s, 2m or 500ms"
        ))
    })?;
    let path = format!("/v1/disks/{}", seg(name)?);
    let rt = runtime()?;
    let at = conn.endpoint()?;
    let token = conn.token(&at)?;
    let t0 = std::time::Instant::now();
    loop {
        let v = rt.block_on(call(&at, token.as_ref(), "GET", &path, None))?;
        let state = v["state"].as_str().unwrap_or("?");
        if state == want.name() {
            if cli.json {
                out!(
                    "{}",
                    json!({ "disk": name, "state": state, "seconds": t0.elapsed().as_secs_f64() })
                );
            } else {
                out!("{name}: {state} after {:.1} s", t0.elapsed().as_secs_f64());
            }
            return Ok(());
        }
        if state == "failed" {
            return Err(CliError::Input(format!(
                "disk {name:?} failed while waiting for {}: {}; see `pdguard disk show {name}`",
                want.name(),
                v["error"].as_str().unwrap_or("no reason recorded")
            )));
        }
        if t0.elapsed() >= limit {
            return Err(CliError::Timeout(format!(
                "disk {name:?} is still {state} after {timeout}, not {}; wait longer with --timeout",
                want.name()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Debug, Subcommand)]
pub enum ContainerCommand {
    /// A container starts and uses disks; returns when every disk is usable.
    Up {
        /// The container's id (any name without '/', '?', '#', '%' or spaces).
        id: String,
        /// A disk the container uses (repeat for several).
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
    },
    /// A container stops (default), crashes or is removed.
    ///
    /// The three states, as the patent counts them ([028]: deleted, crashed or corrupt):
    /// `stopped` (default: stopped on purpose) is still operational and keeps its disks
    /// unsealed, unless the daemon runs with `--seal-stopped`; `--crashed` and `--removed`
    /// are non-operational. When every container of a disk is non-operational, the grace
    /// period starts; then the disk is dangling and sealed.
    Down {
        /// The container's id.
        id: String,
        /// The container crashed (it counts as non-operational).
        #[arg(long, conflicts_with = "removed")]
        crashed: bool,
        /// The container was deleted (it counts as non-operational).
        #[arg(long)]
        removed: bool,
    },
    /// List containers (removed ones whose disks are all released only with --all).
    Ls {
        /// Also list removed containers that no longer hold a disk.
        #[arg(long)]
        all: bool,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CliError::Io {
            what: "cannot start the async runtime".into(),
            source,
        })
}

fn request(conn: &Conn, method: &str, path: &str, body: Option<Value>) -> Result<Value, CliError> {
    let at = conn.endpoint()?;
    let token = conn.token(&at)?;
    Ok(runtime()?.block_on(call(&at, token.as_ref(), method, path, body))?)
}

/// Path segment for a user-given name: refuse characters that would change the URL.
fn seg(name: &str) -> Result<&str, CliError> {
    if name.is_empty() || name.contains(['/', '?', '#', '%', ' ']) {
        return Err(CliError::Input(format!(
            "name {name:?} contains characters that names may not have (letters, digits, '.', '_', '-')"
        )));
    }
    Ok(name)
}

pub fn disk(cmd: &DiskCommand, conn: &Conn, cli: &Cli) -> Result<(), CliError> {
    let v = match cmd {
        DiskCommand::Wait {
            name,
            state,
            timeout,
        } => return wait(name, *state, timeout, conn, cli),
        DiskCommand::Create { name, size, path } => {
            let bytes = *size;
            let given = path;
            let path = path
                .as_deref()
                .map(std::path::absolute)
                .transpose()
                .map_err(|source| CliError::Io {
                    what: "cannot resolve --path".into(),
                    source,
                })?;
            if let (Some(g), Some(p)) = (given, &path) {
                if g.is_relative() {
                    eprintln!(
                        "pdguard: --path {} is relative: using {}",
                        g.display(),
                        p.display()
                    );
                }
            }
            request(
                conn,
                "POST",
                "/v1/disks",
                Some(json!({ "name": name, "size": bytes, "path": path })),
            )?
        }
        DiskCommand::Ls => request(conn, "GET", "/v1/disks", None)?,
        DiskCommand::Show { name } => {
            request(conn, "GET", &format!("/v1/disks/{}", seg(name)?), None)?
        }
        DiskCommand::Rm {
            name,
            shred,
            keep_file,
        } => request(
            conn,
            "DELETE",
            &format!(
                "/v1/disks/{}?shred={shred}&keep_file={keep_file}",
                seg(name)?
            ),
            None,
        )?,
        DiskCommand::Seal { name, force } => request(
            conn,
            "POST",
            &format!("/v1/disks/{}/seal?force={force}", seg(name)?),
            None,
        )?,
        DiskCommand::Unseal { name } => request(
            conn,
            "POST",
            &format!("/v1/disks/{}/unseal", seg(name)?),
            None,
        )?,
    };
    if cli.json {
        out!("{v}");
        return Ok(());
    }
    match cmd {
        DiskCommand::Ls => print_disks(&v["disks"]),
        DiskCommand::Rm {
            name,
            shred,
            keep_file,
        } => {
            let how = match (shred, keep_file) {
                (true, _) => {
                    " after shredding it: its key is destroyed and its data cannot be recovered"
                }
                (_, true) => "; its file and seal record are kept as they were",
                _ => "",
            };
            out!("removed disk {name}{how}");
        }
        _ => print_disk(&v),
    }
    Ok(())
}

pub fn container(cmd: &ContainerCommand, conn: &Conn, cli: &Cli) -> Result<(), CliError> {
    // What the disks were before, to say afterwards what changed.
    let before = match cmd {
        ContainerCommand::Ls { .. } => Value::Null,
        _ => request(conn, "GET", "/v1/status", None)?,
    };
    let t0 = std::time::Instant::now();
    let v = match cmd {
        ContainerCommand::Up { id, disks } => request(
            conn,
            "POST",
            &format!("/v1/containers/{}/up", seg(id)?),
            Some(json!({ "disks": disks })),
        )?,
        ContainerCommand::Down {
            id,
            crashed,
            removed,
        } => {
            let state = match (crashed, removed) {
                (_, true) => "removed",
                (true, _) => "crashed",
                _ => "stopped",
            };
            request(
                conn,
                "POST",
                &format!("/v1/containers/{}/down", seg(id)?),
                Some(json!({ "state": state })),
            )?
        }
        ContainerCommand::Ls { .. } => request(conn, "GET", "/v1/containers", None)?,
    };
    if cli.json {
        out!("{v}");
        return Ok(());
    }
    match cmd {
        ContainerCommand::Ls { all } => print_containers(&v["containers"], *all),
        ContainerCommand::Up { id, disks } => {
            let secs = t0.elapsed().as_secs_f64();
            out!("container {id} is running; its disks are usable:");
            for name in disks {
                let was = disk_state(&before, name);
                let did = match was.as_str() {
                    "sealed" | "sealing" | "unsealing" | "migrating" | "failed" => {
                        format!("unsealed and verified in {secs:.1} s (was {was})")
                    }
                    _ => "attached".to_string(),
                };
                out!("  {name}: {did}");
            }
        }
        ContainerCommand::Down { id, .. } => {
            out!(
                "container {id} is {}",
                v["container"]["state"].as_str().unwrap_or("?")
            );
            let after = request(conn, "GET", "/v1/status", None)?;
            let held = before["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["id"].as_str() == Some(id.as_str()))
                .map(|c| c["disks"].clone())
                .unwrap_or(Value::Null);
            for name in held
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                out!("  {name}: {}", disk_news(&after, name));
            }
        }
    }
    Ok(())
}

/// `status --wait`: ask until a daemon answers or `limit` runs out. Only "nobody answers
/// yet" is waited out (no socket, nothing listening, or a TCP daemon's token file not made
/// yet); any other error is final.
fn first_status(
    rt: &tokio::runtime::Runtime,
    at: &crate::api::Endpoint,
    conn: &Conn,
    limit: Option<Duration>,
    text: &str,
) -> Result<Value, CliError> {
    let t0 = std::time::Instant::now();
    loop {
        let attempt = match conn.token(at) {
            Ok(token) => rt
                .block_on(call(at, token.as_ref(), "GET", "/v1/status", None))
                .map_err(CliError::from),
            Err(e) => Err(e),
        };
        let not_yet = matches!(
            &attempt,
            Err(CliError::Client(
                crate::api::client::ClientError::Unreachable(_)
            )) | Err(CliError::Token(_))
        );
        match (attempt, limit) {
            (Ok(v), _) => return Ok(v),
            (Err(_), Some(l)) if not_yet && t0.elapsed() >= l => {
                return Err(CliError::Timeout(format!(
                    "no pdguard daemon answered at {at} within {text}; start one with `pdguard serve`, wait longer with --wait, or point to it with --api or --state-dir"
                )))
            }
            (Err(_), Some(_)) if not_yet => std::thread::sleep(Duration::from_millis(50)),
            (Err(e), _) => return Err(e),
        }
    }
}

pub fn status(
    watch: bool,
    all: bool,
    wait: Option<&str>,
    conn: &Conn,
    cli: &Cli,
) -> Result<(), CliError> {
    let limit = wait
        .map(|w| {
            humantime::parse_duration(w).map_err(|_| {
                CliError::Usage(format!(
                    "--wait {w:?} is not a duration such as 10s, 2m or 500ms"
                ))
            })
        })
        .transpose()?;
    let rt = runtime()?;
    let at = conn.endpoint()?;
    let mut first = Some(first_status(&rt, &at, conn, limit, wait.unwrap_or(""))?);
    let token = conn.token(&at)?;
    loop {
        let v = match first.take() {
            Some(v) => v,
            None => rt.block_on(call(&at, token.as_ref(), "GET", "/v1/status", None))?,
        };
        if cli.json {
            out!("{v}");
        } else {
            if watch && std::io::stdout().is_terminal() {
                out!("\x1b[2J\x1b[H");
            }
            out!(
                "pdguard {} on {at}: profile {}, grace {}",
                v["version"].as_str().unwrap_or("?"),
                v["profile"].as_str().unwrap_or("?"),
                v["grace_ms"]
                    .as_u64()
                    .map_or("?".into(), pdguard_engine::units::millis)
            );
            print_jobs(&v["jobs"]);
            print_docker(&v["docker"]);
            print_disks(&v["disks"]);
            print_containers(&v["containers"], all);
        }
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The job queue (`--jobs`): running, queued, and the order in which the queued start.
fn print_jobs(j: &Value) {
    let (Some(limit), Some(running)) = (j["limit"].as_u64(), j["running"].as_u64()) else {
        return;
    };
    let queued: Vec<&str> = j["queue"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| q["disk"].as_str())
        .collect();
    let mut line = format!(
        "jobs: {running} running of {limit}, {} queued, {} done",
        queued.len(),
        j["done"].as_u64().unwrap_or(0)
    );
    if !queued.is_empty() {
        let shown = queued
            .iter()
            .take(8)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        let more = if queued.len() > 8 { ", ..." } else { "" };
        line.push_str(&format!(" (next: {shown}{more})"));
    }
    out!("{line}");
}

/// The Docker volume plugin's link to dockerd (absent without `--docker`).
fn print_docker(d: &Value) {
    let Some(driver) = d["driver"].as_str() else {
        return;
    };
    if d["reachable"] == true {
        out!("docker: volume driver {driver:?}, dockerd reachable");
    } else {
        out!(
            "docker: volume driver {driver:?}, dockerd UNREACHABLE ({}); nothing is sealed on a guess",
            d["error"].as_str().unwrap_or("not reached yet")
        );
    }
}

/// The state of disk `name` in a `/v1/status` answer.
fn disk_state(status: &Value, name: &str) -> String {
    find_disk(status, name)["state"]
        .as_str()
        .unwrap_or("unknown")
        .to_string()
}

fn find_disk<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["name"].as_str() == Some(name))
        .unwrap_or(&Value::Null)
}

/// A disk's state after a `container down`, and when its grace period ends.
fn disk_news(status: &Value, name: &str) -> String {
    let d = find_disk(status, name);
    let state = d["state"].as_str().unwrap_or("unknown");
    match (state, d["grace_until_ms"].as_u64()) {
        ("grace", Some(until)) => {
            let now = pdguard_engine::service::now_ms();
            let left = until.saturating_sub(now) as f64 / 1000.0;
            let at = std::time::UNIX_EPOCH
                .checked_add(Duration::from_millis(until))
                .map_or_else(
                    || format!("{until} ms"),
                    |t| humantime::format_rfc3339_seconds(t).to_string(),
                );
            format!("grace until {at} (in {left:.0} s); then it is sealed unless a container takes it back")
        }
        ("attached", _) => "attached: another running container still uses it".into(),
        (s, _) => s.to_string(),
    }
}

/// Names in natural order: d2 before d10.
fn natural_key(s: &str) -> Vec<(u8, u128, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        let digit = c.is_ascii_digit();
        let mut run = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_ascii_digit() != digit {
                break;
            }
            run.push(c);
            chars.next();
        }
        match (digit, run.parse::<u128>()) {
            (true, Ok(n)) => out.push((0, n, run)),
            _ => out.push((1, 0, run)),
        }
    }
    out
}

fn sorted_by<'a>(items: &'a Value, key: &str) -> Vec<&'a Value> {
    let mut v: Vec<&Value> = items.as_array().into_iter().flatten().collect();
    v.sort_by_cached_key(|x| natural_key(x[key].as_str().unwrap_or("")));
    v
}

fn progress_of(d: &Value) -> String {
    let p = &d["progress"];
    match (p["done_bytes"].as_u64(), p["total_bytes"].as_u64()) {
        (Some(done), Some(total)) if total > 0 => format!(
            "{} {} {:.0}%",
            p["job"].as_str().unwrap_or(""),
            p["pass"].as_str().unwrap_or(""),
            done as f64 * 100.0 / total as f64
        ),
        _ => String::new(),
    }
}

fn print_disks(disks: &Value) {
    out!(
        "{:<16} {:<10} {:<8} {:>12}  {:<24} PATH",
        "DISK",
        "STATE",
        "DANGLING",
        "SIZE",
        "JOB"
    );
    for d in sorted_by(disks, "name") {
        out!(
            "{:<16} {:<10} {:<8} {:>12}  {:<24} {}",
            d["name"].as_str().unwrap_or("?"),
            d["state"].as_str().unwrap_or("?"),
            d["dangling"].to_string(),
            d["size"]
                .as_u64()
                .map_or("?".into(), pdguard_engine::units::bytes),
            match progress_of(d) {
                p if p.is_empty() && d["unmount_pending"] == true => "unmount pending".into(),
                p => p,
            },
            d["path"].as_str().unwrap_or("?")
        );
    }
}

fn print_disk(d: &Value) {
    for k in [
        "name",
        "id",
        "state",
        "dangling",
        "size",
        "sector_size",
        "path",
        "containers",
        "error",
    ] {
        if !d[k].is_null() {
            let text = match &d[k] {
                Value::String(s) => s.clone(),
                Value::Number(n) if k == "size" => n
                    .as_u64()
                    .map_or(n.to_string(), pdguard_engine::units::bytes),
                other => other.to_string(),
            };
            out!("{k:<12} {text}");
        }
    }
    let p = progress_of(d);
    if !p.is_empty() {
        out!("{:<12} {p}", "job");
    }
    if d["unmount_pending"] == true {
        out!(
            "{:<12} the kernel still holds its file system (a process uses it); retried every second, sealed only once free",
            "unmount"
        );
    }
}

/// Containers in natural order; a removed one that holds no disk any more only with `all`.
fn print_containers(cs: &Value, all: bool) {
    out!("{:<24} {:<10} DISKS", "CONTAINER", "STATE");
    for c in sorted_by(cs, "id") {
        let disks: Vec<&str> = c["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !all && disks.is_empty() && c["state"].as_str() == Some("removed") {
            continue;
        }
        out!(
            "{:<24} {:<10} {}",
            c["id"].as_str().unwrap_or("?"),
            c["state"].as_str().unwrap_or("?"),
            disks.join(",")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_naturally() {
        let v = json!([{ "name": "d10" }, { "name": "d2" }, { "name": "a" }, { "name": "d1" }]);
        let names: Vec<&str> = sorted_by(&v, "name")
            .iter()
            .filter_map(|d| d["name"].as_str())
            .collect();
        assert_eq!(names, ["a", "d1", "d2", "d10"]);
    }
}
