//! Clients of the daemon: `pdguard disk …`, `pdguard container …`, `pdguard status`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::{parse_size, serve, Cli, CliError};
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
}

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Register a new disk (a sparse file in STATE/disks/, or at --path).
    Create {
        name: String,
        /// Size, e.g. 64M or 1G (a multiple of 512 bytes).
        #[arg(long)]
        size: String,
        /// Use this file (absolute path) instead of one in the state directory.
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// List disks.
    Ls,
    /// Show one disk.
    Show { name: String },
    /// Delete a disk (and its file, if it lives in the state directory).
    Rm {
        name: String,
        /// Crypto-erase a sealed disk first (secure profile).
        #[arg(long)]
        shred: bool,
    },
    /// Seal a disk now.
    Seal {
        name: String,
        /// Seal it even while running containers or NBD clients use it: their I/O is
        /// held during the seal, then refused (or read-only, per --sealed-io).
        #[arg(long)]
        force: bool,
    },
    /// Unseal a sealed disk now.
    Unseal { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ContainerCommand {
    /// A container starts and uses disks; returns when every disk is usable.
    Up {
        id: String,
        /// A disk the container uses (repeat for several).
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
    },
    /// A container stops (default), crashes or is removed.
    Down {
        id: String,
        #[arg(long, conflicts_with = "removed")]
        crashed: bool,
        #[arg(long)]
        removed: bool,
    },
    /// List containers.
    Ls,
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
    Ok(runtime()?.block_on(call(&at, method, path, body))?)
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
        DiskCommand::Create { name, size, path } => {
            let bytes = parse_size(size).ok_or_else(|| {
                CliError::Usage(format!("--size {size:?} is not a size such as 64M or 1G"))
            })?;
            let path = path
                .as_deref()
                .map(std::path::absolute)
                .transpose()
                .map_err(|source| CliError::Io {
                    what: "cannot resolve --path".into(),
                    source,
                })?;
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
        DiskCommand::Rm { name, shred } => request(
            conn,
            "DELETE",
            &format!("/v1/disks/{}?shred={shred}", seg(name)?),
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
        DiskCommand::Rm { name, .. } => out!("removed disk {name}"),
        _ => print_disk(&v),
    }
    Ok(())
}

pub fn container(cmd: &ContainerCommand, conn: &Conn, cli: &Cli) -> Result<(), CliError> {
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
        ContainerCommand::Ls => request(conn, "GET", "/v1/containers", None)?,
    };
    if cli.json {
        out!("{v}");
        return Ok(());
    }
    match cmd {
        ContainerCommand::Ls => print_containers(&v["containers"]),
        ContainerCommand::Up { id, .. } => {
            out!("container {id} is running; its disks are usable:");
            print_disks(&v["disks"]);
        }
        ContainerCommand::Down { id, .. } => out!(
            "container {id} is {}",
            v["container"]["state"].as_str().unwrap_or("?")
        ),
    }
    Ok(())
}

pub fn status(watch: bool, conn: &Conn, cli: &Cli) -> Result<(), CliError> {
    let rt = runtime()?;
    let at = conn.endpoint()?;
    loop {
        let v = rt.block_on(call(&at, "GET", "/v1/status", None))?;
        if cli.json {
            out!("{v}");
        } else {
            if watch && std::io::stdout().is_terminal() {
                out!("\x1b[2J\x1b[H");
            }
            out!(
                "pdguard {} on {at}: profile {}, grace {} ms",
                v["version"].as_str().unwrap_or("?"),
                v["profile"].as_str().unwrap_or("?"),
                v["grace_ms"]
            );
            print_disks(&v["disks"]);
            print_containers(&v["containers"]);
        }
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
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
    for d in disks.as_array().into_iter().flatten() {
        out!(
            "{:<16} {:<10} {:<8} {:>12}  {:<24} {}",
            d["name"].as_str().unwrap_or("?"),
            d["state"].as_str().unwrap_or("?"),
            d["dangling"].to_string(),
            d["size"].to_string(),
            progress_of(d),
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
                other => other.to_string(),
            };
            out!("{k:<12} {text}");
        }
    }
    let p = progress_of(d);
    if !p.is_empty() {
        out!("{:<12} {p}", "job");
    }
}

fn print_containers(cs: &Value) {
    out!("{:<24} {:<10} DISKS", "CONTAINER", "STATE");
    for c in cs.as_array().into_iter().flatten() {
        let disks: Vec<&str> = c["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        out!(
            "{:<24} {:<10} {}",
            c["id"].as_str().unwrap_or("?"),
            c["state"].as_str().unwrap_or("?"),
            disks.join(",")
        );
    }
}
