//! Command-line front-end: `pdguard image …` (offline, on one image) and `pdguard demo`.

/// Print a line on stdout. A closed pipe (`pdguard … | head`) is not an error worth a panic:
/// the line is dropped.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}
pub(crate) use out;

mod client;
mod demo;
mod docs;
mod image;
mod paths;
mod progress;
mod rescue;
mod serve;
pub mod size;
mod testhook;
pub mod usage;
mod values;

/// Where the daemon keeps its state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pdguard";
/// What is logged when `PDGUARD_LOG` is not set: warnings, and what the daemon's service
/// does (disks turning dangling, jobs resumed or retried). `--help` quotes it.
pub const DEFAULT_LOG: &str = "warn,pdguard_engine::service=info";
/// The environment variable that names the state directory.
pub const STATE_DIR_ENV: &str = "PDGUARD_STATE_DIR";

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use thiserror::Error;

use pdguard_engine::jobs::JobError;
use pdguard_engine::keyfile::{self, KeyFileError};

#[derive(Debug, Parser)]
#[command(
    name = "pdguard",
    version,
    about = "Secures dangling persistent disks: seals them (patent IN202341088402) and restores them bit-exact",
    propagate_version = true
)]
pub struct Cli {
    /// No progress bar (image seal, unseal and verify draw one on stderr when it is a
    /// terminal).
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Print the result as one JSON object on stdout; an error too, as
    /// {"error": "...", "exit_code": N}.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Seal, unseal, verify or inspect one disk image, offline (no daemon).
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Run the daemon: registry, dangling flag, background sealing, reclaim, admin API.
    Serve(Box<serve::ServeArgs>),
    /// Manage the daemon's disks.
    Disk {
        #[command(flatten)]
        conn: client::Conn,
        #[command(subcommand)]
        cmd: client::DiskCommand,
    },
    /// Tell the daemon about containers and the disks they use.
    Container {
        #[command(flatten)]
        conn: client::Conn,
        #[command(subcommand)]
        cmd: client::ContainerCommand,
    },
    /// Disks, containers and running jobs of the daemon.
    Status {
        #[command(flatten)]
        conn: client::Conn,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
        /// Also list removed containers that no longer hold a disk.
        #[arg(long)]
        all: bool,
        /// Wait up to this long for a daemon that is starting to answer (e.g. 10s), for
        /// scripts that start `pdguard serve &`; exit 124 if none answers by then.
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
    },
    /// Write a new random master key file (mode 0600); never overwrites one.
    Keygen {
        /// Where to write the key, e.g. /etc/pdguard/master.key.
        path: PathBuf,
    },
    /// Walk through a seal and unseal on a sample image with text in it, in both profiles.
    Demo {
        /// Directory for the sample image, demo.img, and its key, demo-master.key (default:
        /// a new temporary directory, removed at the end).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Size of the sample image, from 8K to 1G in whole 512-byte sectors, e.g. 8M or
        /// 1.5M (K, M, G: powers of 1024).
        #[arg(long, value_name = "SIZE", default_value = "8M", value_parser = size::demo)]
        size: u64,
    },
    /// Print a shell completion script for bash, zsh or fish.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: docs::Shell,
    },
    /// Print the manual page (roff: `pdguard man | man -l -`), or write one page per command.
    Man {
        /// Write pdguard.1, pdguard-disk-create.1, … into this existing directory instead.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Error)]
pub enum CliError {
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Reclaim(#[from] pdguard_engine::jobs::reclaim::ReclaimError),
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error(transparent)]
    Client(#[from] crate::api::client::ClientError),
    #[error(transparent)]
    Token(#[from] crate::api::auth::TokenError),
    #[error("the daemon cannot start")]
    Service(#[from] pdguard_engine::service::ServiceError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Input(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("demo failed: {0}")]
    Demo(String),
    /// A command did its work but the data did not verify (exit 3).
    #[error("{0}")]
    Unverified(String),
    /// A wait ran out of time (exit 124, like timeout(1)).
    #[error("{0}")]
    Timeout(String),
}

impl CliError {
    /// The exit codes listed at the end of `pdguard --help`.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Job(e) if e.is_verification() => 3,
            Self::Reclaim(e) if e.is_verification() => 3,
            Self::Client(crate::api::client::ClientError::Api { code, .. })
                if code == "verification_failed" =>
            {
                3
            }
            Self::Usage(_) => 2,
            Self::Unverified(_) => 3,
            Self::Timeout(_) => 124,
            _ => 1,
        }
    }
}

/// The whole cause chain on one line, each cause once.
pub fn error_chain(e: &CliError) -> String {
    pdguard_engine::error_chain(e)
}

pub fn run(cli: &Cli) -> Result<(), CliError> {
    // Commands that hold keys, seeds or plaintext: no core dumps, no ptrace by non-root.
    if matches!(
        cli.command,
        Command::Image(_) | Command::Serve(_) | Command::Keygen { .. } | Command::Demo { .. }
    ) {
        keyfile::keep_out_of_core_dumps()?;
    }
    match &cli.command {
        Command::Image(cmd) => image::run(cmd, cli),
        Command::Demo { dir, size } => demo::run(dir.clone(), *size, cli),
        Command::Completions { shell } => docs::completions(*shell),
        Command::Man { dir } => docs::man(dir.as_deref()),
        Command::Keygen { path } => keygen(path, cli),
        Command::Serve(a) => serve::run(a),
        Command::Disk { conn, cmd } => client::disk(cmd, conn, cli),
        Command::Container { conn, cmd } => client::container(cmd, conn, cli),
        Command::Status {
            conn,
            watch,
            all,
            wait,
        } => client::status(*watch, *all, wait.as_deref(), conn, cli),
    }
}

fn keygen(path: &std::path::Path, cli: &Cli) -> Result<(), CliError> {
    let key = keyfile::generate(path)?;
    if cli.json {
        let v = serde_json::json!({ "command": "keygen", "path": path.display().to_string(), "key_id": key.id() });
        out!("{v}");
    } else {
        out!(
            "wrote master key {} (id {}, mode 0600); back it up: without it no secure seal made with it can be unsealed",
            path.display(),
            key.id()
        );
    }
    Ok(())
}
