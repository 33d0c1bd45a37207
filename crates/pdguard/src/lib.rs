//! pdguard's front-ends as a library: the CLI, the daemon's HTTP API, the NBD export and
//! the Docker volume plugin. The `pdguard` binary (`main.rs`) only calls [`main`]; the
//! library exists so that the fuzz targets (`fuzz/`) and the corpus replay test
//! (`tests/fuzz_corpus.rs`) reach the parsers through [`fuzz_check`].

// Private: the library's interface is `main` and the fuzz checks, so the lints judge the
// modules as the binary's own, as before the library existed.
mod api;
mod cli;
pub mod fuzz_check;
mod nbd;
mod plugin;

use std::process::ExitCode;

/// Parse the command line, run it, print the error chain once and map it to the exit codes
/// of `pdguard --help` (0 ok, 1 error, 2 usage, 3 verification failed).
pub fn main() -> ExitCode {
    let args = match cli::usage::parse() {
        Ok(args) => args,
        Err(code) => return code,
    };
    init_logging();
    match cli::run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = cli::error_chain(&e);
            eprintln!("pdguard: {line}");
            if args.json {
                let v = serde_json::json!({ "error": line, "exit_code": e.exit_code() });
                cli::out!("{v}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs go to stderr, filtered by `PDGUARD_LOG` (default: warnings, and what the daemon's
/// service does: disks turning dangling, jobs resumed or retried). They never carry data,
/// seeds or keys.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PDGUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli::DEFAULT_LOG));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
