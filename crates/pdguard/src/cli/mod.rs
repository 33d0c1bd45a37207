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
mod image;
mod progress;
mod rescue;
mod serve;
mod testhook;

/// Where the daemon keeps its state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pdguard";
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
    /// No progress bar.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Print the result as one JSON object on stdout.
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
    Serve(serve::ServeArgs),
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
    },
    /// Write a new random master key file (mode 0600); never overwrites one.
    Keygen {
        /// Where to write the key, e.g. /etc/pdguard/master.key.
        path: PathBuf,
    },
    /// Walk through a seal and unseal on a sample image with text in it.
    Demo {
        /// Directory for the sample image (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Size of the sample image, e.g. 8M.
        #[arg(long, default_value = "8M")]
        size: String,
    },
}

#[derive(Debug, Error)]
pub enum CliError {
    #[error(transparent)]
    Job(#[from] JobError),
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
    /// Exit codes of DESIGN.md §5.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Job(e) if e.is_verification() => 3,
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
        Command::Demo { dir, size } => demo::run(dir.clone(), size, cli),
        Command::Keygen { path } => keygen(path, cli),
        Command::Serve(a) => serve::run(a),
        Command::Disk { conn, cmd } => client::disk(cmd, conn, cli),
        Command::Container { conn, cmd } => client::container(cmd, conn, cli),
        Command::Status { conn, watch, all } => client::status(*watch, *all, conn, cli),
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

/// Parse a size such as `64M`, `1G`, `4096` or `512K` (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1K"), None);
        assert_eq!(parse_size("99999999999T"), None);
        assert_eq!(parse_size(""), None);
    }
}
